"""Heads, DINO/iBOT/KoLeo losses and teacher centering against hand-computed references."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2_repro.losses import DINOLoss, KoLeoLoss, SoftmaxCentering, iBOTPatchLoss, sinkhorn_knopp_center
from dinov2_repro.models.heads import DINOHead


# ---------------------------------------------------------------- numpy references (explicit loops)
def np_log_softmax(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    m = max(v)
    lse = m + math.log(sum(math.exp(x - m) for x in v))
    return np.array([x - lse for x in v])


def np_ce(student_row, teacher_row, temp=0.1) -> float:
    logp = np_log_softmax(np.asarray(student_row, dtype=np.float64) / temp)
    return -sum(float(teacher_row[k]) * logp[k] for k in range(len(logp)))


def np_sinkhorn(logits: np.ndarray, tau: float, n_iter: int) -> np.ndarray:
    """The recipe, literally, in float64 with no stabilisation."""
    q = np.exp(np.asarray(logits, dtype=np.float64) / tau).T  # K x B
    n_k, n_b = q.shape
    q = q / q.sum()
    for _ in range(n_iter):
        for k in range(n_k):
            q[k, :] = q[k, :] / q[k, :].sum() / n_k
        for b in range(n_b):
            q[:, b] = q[:, b] / q[:, b].sum() / n_b
    return (q * n_b).T


def seeded(*shape, seed=0, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def softmax_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


# ---------------------------------------------------------------- DINO loss
def test_dino_loss_matches_pair_loops():
    S, T, B, K = 3, 2, 2, 4
    student = seeded(S, B, K, seed=1)
    teacher = softmax_rows(seeded(T, B, K, seed=2) * 3)
    loss_fn = DINOLoss()
    expected_all, expected_offdiag = 0.0, 0.0
    for s in range(S):
        for t in range(T):
            term = sum(np_ce(student[s, b].numpy(), teacher[t, b].numpy()) for b in range(B)) / B
            expected_all += term
            if s != t:
                expected_offdiag += term
    assert loss_fn(student, teacher).item() == pytest.approx(expected_all, rel=1e-5)
    assert loss_fn(student, teacher, ignore_diagonal=True).item() == pytest.approx(expected_offdiag, rel=1e-5)
    assert expected_offdiag < expected_all  # the diagonal terms are positive, so skipping them matters


def test_dino_loss_crop_bookkeeping_18_terms():
    B, K = 2, 5
    n_global, n_local = 2, 8
    # Uniform teacher + constant student logits: every pair term is exactly log K, so the sums
    # count the pair terms.
    uniform_teacher = torch.full((n_global, B, K), 1.0 / K)
    loss_fn = DINOLoss()
    local = loss_fn(torch.zeros(n_local, B, K), uniform_teacher)
    glob = loss_fn(torch.zeros(n_global, B, K), uniform_teacher, ignore_diagonal=True)
    assert local.item() / math.log(K) == pytest.approx(16.0, rel=1e-6)
    assert glob.item() / math.log(K) == pytest.approx(2.0, rel=1e-6)

    # Random inputs: (local + global) / 18 equals the mean over the 18 explicit pairs, with the
    # student's global crop A matched to the teacher's crop B and vice versa.
    s_global, s_local = seeded(n_global, B, K, seed=3), seeded(n_local, B, K, seed=4)
    t = softmax_rows(seeded(n_global, B, K, seed=5) * 2)
    pairs = [(s_local[i], t[j]) for i in range(n_local) for j in range(n_global)]
    pairs += [(s_global[0], t[1]), (s_global[1], t[0])]
    assert len(pairs) == 18
    expected = sum(np_ce(s[b].numpy(), tt[b].numpy()) for s, tt in pairs for b in range(B)) / B / 18
    got = (loss_fn(s_local, t) + loss_fn(s_global, t, ignore_diagonal=True)) / 18
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_gradient_and_errors():
    student = seeded(2, 3, 4, seed=6).requires_grad_()
    teacher = softmax_rows(seeded(2, 3, 4, seed=7))
    DINOLoss()(student, teacher, ignore_diagonal=True).backward()
    # d/ds of CE(s/0.1) for the swapped pair: (softmax(s/0.1) - t_other) / 0.1 / B
    expected = (torch.softmax(student.detach() / 0.1, -1) - teacher.flip(0)) / 0.1 / 3
    assert torch.allclose(student.grad, expected, atol=1e-5)
    with pytest.raises(ValueError, match="B, K"):
        DINOLoss()(torch.zeros(2, 3, 4), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="S, B, K"):
        DINOLoss()(torch.zeros(6, 4), torch.zeros(2, 3, 4))


# ---------------------------------------------------------------- iBOT loss
def test_ibot_loss_weighting():
    K = 3
    # Image 0 has 2 masked tokens, image 1 has 1; the batch has 4 global-crop images in all.
    student = seeded(3, K, seed=8)
    teacher = softmax_rows(seeded(3, K, seed=9) * 2)
    weights = torch.tensor([1 / 2, 1 / 2, 1 / 1])
    ce = [np_ce(student[i].numpy(), teacher[i].numpy()) for i in range(3)]
    expected = ((ce[0] + ce[1]) / 2 + ce[2] / 1) / 4
    got = iBOTPatchLoss()(student, teacher, weights, n_images=4)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # No masked tokens: zero, still differentiable.
    empty = torch.zeros(0, K, requires_grad=True)
    zero = iBOTPatchLoss()(empty, torch.zeros(0, K), torch.zeros(0), n_images=4)
    zero.backward()
    assert zero.item() == 0.0
    with pytest.raises(ValueError, match="masks_weight"):
        iBOTPatchLoss()(student, teacher, torch.ones(2), n_images=4)
    with pytest.raises(ValueError, match="n_images"):
        iBOTPatchLoss()(student, teacher, weights, n_images=0)


# ---------------------------------------------------------------- KoLeo
def test_koleo_three_points_by_hand():
    # Directions at 0, 30 and 100 degrees (different lengths: KoLeo normalises first).
    # NN(0) = 30, NN(30) = 0 (30 deg apart); NN(100) = 30 (70 deg apart).
    # Chord length of an angle a on the unit circle: 2 sin(a / 2).
    angles = [0.0, 30.0, 100.0]
    radii = [1.0, 2.5, 0.3]
    pts = torch.tensor([[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))] for a, r in zip(angles, radii)])
    chord30, chord70 = 2 * math.sin(math.radians(15)), 2 * math.sin(math.radians(35))
    expected = -(2 * math.log(chord30) + math.log(chord70)) / 3
    assert KoLeoLoss()(pts).item() == pytest.approx(expected, abs=1e-6)


def test_koleo_batch_of_one_is_zero_and_differentiable():
    x = torch.randn(1, 8, requires_grad=True)
    loss = KoLeoLoss()(x)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_koleo_exact_duplicates_finite_value_and_gradient():
    base = seeded(3, 16, seed=10)
    # Rows 0, 3 and 4 are identical: 0 and 3 are each other's neighbours (their gradients cancel),
    # 4 also points at 0, so its gradient does not cancel and is large.
    x = torch.cat([base, base[:1], base[:1]]).requires_grad_()
    loss = KoLeoLoss()(x)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().max() > 1.0  # the duplicate terms really are in the graph
    # The three duplicate terms dominate: each is -log(eps * sqrt(D) + eps) = -log(5e-8); the two
    # other terms are >= -log 2.
    assert loss.item() > (3 * -math.log(1e-8 * (math.sqrt(16) + 1)) - 2 * math.log(2)) / 5 - 1e-4
    # All duplicates (collapsed batch), also under bf16 autocast with bf16 input.
    collapsed = torch.ones(4, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(collapsed)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(collapsed.grad.float()).all()


# ---------------------------------------------------------------- Sinkhorn-Knopp
def test_sinkhorn_matches_literal_recipe():
    logits = seeded(3, 5, seed=11)
    for n_iter in (0, 1, 3):
        got = sinkhorn_knopp_center(logits, 0.5, n_iterations=n_iter)
        expected = np_sinkhorn(logits.numpy(), 0.5, n_iter)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_sinkhorn_stable_at_low_temperature_and_exact_per_prototype_shift():
    logits = seeded(6, 4, seed=12, scale=10.0)  # exp(logit / 0.04) overflows fp32 without the shift
    got = sinkhorn_knopp_center(logits, 0.04)
    assert torch.isfinite(got).all()
    # Adding a constant per prototype must not change the result (what the max-shift relies on).
    shifted = sinkhorn_knopp_center(logits + torch.tensor([[50.0, -3.0, 7.0, 0.5]]), 0.04)
    assert torch.allclose(got, shifted, atol=1e-6)
    # Same as the literal recipe on logits small enough for the unshifted float64 version.
    small = seeded(6, 4, seed=13)
    np.testing.assert_allclose(sinkhorn_knopp_center(small, 0.04).numpy(), np_sinkhorn(small.numpy(), 0.04, 3),
                               rtol=1e-4, atol=1e-7)


def test_sinkhorn_rows_sum_to_one_and_masses_approach_uniform():
    B, K, tau = 32, 8, 0.2
    logits = seeded(B, K, seed=14)
    tv = {}  # total variation between the prototype masses and uniform
    for n_iter in (1, 3, 10, 100, 1000):
        q = sinkhorn_knopp_center(logits, tau, n_iterations=n_iter)
        assert torch.allclose(q.sum(dim=1), torch.ones(B), atol=1e-6)
        masses = q.sum(dim=0) / B
        tv[n_iter] = 0.5 * (masses - 1.0 / K).abs().sum().item()
        if n_iter == 1000:
            assert torch.allclose(masses, torch.full((K,), 1.0 / K), rtol=1e-5)
    # Measured (B=32, K=8, tau=0.2, 40 seeds): 1 it 0.09-0.28, 3 its 0.04-0.16, 10 its <= 0.04,
    # 100 its <= 5e-8. The recipe's 3 iterations only roughly balance the prototypes.
    assert tv[1] > tv[3] > tv[10] > tv[100]
    assert tv[3] < 0.2
    assert tv[1000] < 1e-6
    # n_samples is the B of the recipe; passing the true count is the same as inferring it.
    q = sinkhorn_knopp_center(logits, 0.1)
    assert torch.allclose(q, sinkhorn_knopp_center(logits, 0.1, n_samples=B), atol=1e-7)
    assert torch.allclose(q, sinkhorn_knopp_center(logits, 0.1, n_samples=torch.tensor(B)), atol=1e-7)
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_knopp_center(logits, 0.0)
    with pytest.raises(ValueError, match="2 dims"):
        sinkhorn_knopp_center(logits[None], 0.1)


# ---------------------------------------------------------------- softmax centering
def test_softmax_centering_output_and_ema_by_hand():
    K = 4
    centering = SoftmaxCentering(out_dim=K, momentum=0.9)
    t1 = seeded(3, K, seed=15)
    t2 = seeded(2, 2, K, seed=16)  # leading dims are flattened
    tau = 0.07
    probs = centering(t1, tau)
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(probs, torch.softmax(t1 / tau, -1), atol=1e-6)  # center starts at 0
    centering.update(t1)
    c1 = [0.9 * 0.0 + 0.1 * sum(float(t1[i, k]) for i in range(3)) / 3 for k in range(K)]
    assert torch.allclose(centering.center, torch.tensor([c1]), atol=1e-6)
    probs2 = centering(t2, tau)  # uses the center after step 1, not t2's mean
    expected2 = torch.softmax((t2 - torch.tensor(c1)) / tau, -1)
    assert torch.allclose(probs2, expected2, atol=1e-6)
    centering.update(t2)
    c2 = [0.9 * c1[k] + 0.1 * sum(float(t2[i, j, k]) for i in range(2) for j in range(2)) / 4 for k in range(K)]
    assert torch.allclose(centering.center, torch.tensor([c2]), atol=1e-6)
    centering.update(torch.zeros(0, K))  # nothing to average: center unchanged
    assert torch.allclose(centering.center, torch.tensor([c2]), atol=1e-6)
    assert "center" in centering.state_dict()
    with pytest.raises(ValueError, match="out_dim=4"):
        centering(torch.zeros(2, 5), tau)


# ---------------------------------------------------------------- distributed (2 gloo ranks)
_DIST_B, _DIST_K = 6, 5


def _dist_inputs():
    logits = seeded(_DIST_B, _DIST_K, seed=17, scale=2.0)
    centering_rows = seeded(4, _DIST_K, seed=18)
    return logits, centering_rows


def _dist_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        logits, rows = _dist_inputs()
        half = _DIST_B // 2
        mine = logits[rank * half:(rank + 1) * half]
        results = {
            "sk": sinkhorn_knopp_center(mine, 0.1),
            "sk_given_n": sinkhorn_knopp_center(mine, 0.1, n_samples=_DIST_B),
            # Uneven split, rank 1 has no rows at all (e.g. no masked tokens on that rank).
            "sk_uneven": sinkhorn_knopp_center(logits if rank == 0 else logits[:0], 0.1),
        }
        centering = SoftmaxCentering(out_dim=_DIST_K)
        centering.update(rows[:3] if rank == 0 else rows[3:])  # 3 rows vs 1 row
        results["center"] = centering.center
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_matches_single_process(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    logits, rows = _dist_inputs()
    single = sinkhorn_knopp_center(logits, 0.1)
    assert torch.allclose(torch.cat([r0["sk"], r1["sk"]]), single, atol=1e-6)
    assert torch.allclose(torch.cat([r0["sk_given_n"], r1["sk_given_n"]]), single, atol=1e-6)
    assert torch.allclose(r0["sk_uneven"], single, atol=1e-6) and r1["sk_uneven"].shape == (0, _DIST_K)
    # The distributed result differs from what each rank would get alone.
    assert not torch.allclose(r0["sk"], sinkhorn_knopp_center(logits[:3], 0.1), atol=1e-3)
    reference = SoftmaxCentering(out_dim=_DIST_K)
    reference.update(rows)
    assert torch.allclose(r0["center"], reference.center, atol=1e-6)
    assert torch.allclose(r1["center"], reference.center, atol=1e-6)


# ---------------------------------------------------------------- DINO head
def test_dino_head_shape_init_names_and_forward():
    head = DINOHead(in_dim=12, out_dim=7, hidden_dim=16, bottleneck_dim=8, nlayers=3)
    x = seeded(5, 12, seed=19)
    out = head(x)
    assert out.shape == (5, 7)
    assert head(seeded(2, 3, 12, seed=20)).shape == (2, 3, 7)
    assert torch.equal(head.last_layer.weight_g, torch.ones(7, 1))
    names = dict(head.named_parameters())
    assert set(n for n in names if "last_layer" in n) == {"last_layer.weight_v", "last_layer.weight_g"}
    assert names["last_layer.weight_v"].shape == (7, 8)
    assert all(p.requires_grad for p in names.values())
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 16), (16, 16), (16, 8)]
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    assert 0.015 < linears[1].weight.std().item() < 0.025  # trunc-normal(0.02): 256 samples
    # Forward by hand: MLP with GELU -> L2 normalise -> g * v / ||v||.
    h = x
    for i, m in enumerate(linears):
        h = h @ m.weight.T + m.bias
        if i < len(linears) - 1:
            h = torch.nn.functional.gelu(h)
    h = h / h.norm(dim=-1, keepdim=True)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    expected = h @ (g * v / v.norm(dim=1, keepdim=True)).T
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.abs().max() <= 1.0 + 1e-6  # g = 1: logits are cosine similarities
    # Weight norm: rescaling v leaves the output unchanged; g scales it.
    with torch.no_grad():
        head.last_layer.weight_v.mul_(3.0)
        head.last_layer.weight_g[2] = 2.0
    out2 = head(x)
    assert torch.allclose(out2[:, [0, 1, 3, 4, 5, 6]], out[:, [0, 1, 3, 4, 5, 6]], atol=1e-6)
    assert torch.allclose(out2[:, 2], 2 * out[:, 2], atol=1e-6)
    # Gradients reach both weight-norm factors; the state dict holds plain tensors.
    out2.sum().backward()
    assert head.last_layer.weight_g.grad is not None and head.last_layer.weight_v.grad is not None
    fresh = DINOHead(in_dim=12, out_dim=7, hidden_dim=16, bottleneck_dim=8, nlayers=3)
    fresh.load_state_dict(head.state_dict())
    assert torch.allclose(fresh(x), out2, atol=1e-6)


def test_dino_head_zero_input_bf16_and_errors():
    head = DINOHead(in_dim=6, out_dim=5, hidden_dim=8, bottleneck_dim=4, nlayers=1)
    assert len(head.mlp) == 1
    with torch.no_grad():
        head.mlp[0].bias.zero_()
    assert torch.isfinite(head(torch.zeros(2, 6))).all()  # all-zero bottleneck: normalise eps, no NaN
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(seeded(3, 6, seed=21))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    with pytest.raises(ValueError, match="bottleneck_dim"):
        DINOHead(in_dim=6, out_dim=5, bottleneck_dim=0)
    with pytest.raises(ValueError, match="last dim 6"):
        head(torch.zeros(2, 7))
