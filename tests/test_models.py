"""The ViT family: sizes, packed forward/backward, pos-embed interpolation, intermediate
layers, efficient stochastic depth and the attention backend switch."""
from __future__ import annotations

import pytest
import torch

from dinov2_repro.models import DinoVisionTransformer, build_vit
from dinov2_repro.models.layers import Block, resolve_backend
from dinov2_repro.models.layers import block as block_module

OUTPUT_KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _visible_tiny(**kwargs) -> DinoVisionTransformer:
    """vit_tiny whose every part shows in the outputs: LayerScale 1 instead of 1e-5 and
    non-trivial tokens, so cross-sequence leaks or a wrong mask token cannot hide."""
    torch.manual_seed(0)
    model = build_vit("vit_tiny", init_values=1.0, **kwargs)
    with torch.no_grad():
        model.cls_token.normal_()
        model.mask_token.normal_()
        if model.register_tokens is not None:
            model.register_tokens.normal_()
    return model


# ---- sizes -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,kwargs,low,high",
    [
        ("vit_small", {}, 21.5e6, 22.5e6),
        ("vit_base", {}, 85.5e6, 87.0e6),
        ("vit_large", {}, 303e6, 305.5e6),
        ("vit_giant2", {"ffn_layer": "swiglu"}, 1.12e9, 1.15e9),
    ],
)
def test_parameter_counts(arch, kwargs, low, high):
    # Meta device: shapes only, no memory or init cost, so even ViT-g is instant.
    with torch.device("meta"):
        model = build_vit(arch, **kwargs)
    count = sum(p.numel() for p in model.parameters())
    print(f"{arch}: {count / 1e6:.2f}M parameters (backbone, no heads)")
    assert low <= count <= high, f"{arch} has {count} parameters"


# ---- packed forward ----------------------------------------------------------------------
def _outputs_and_input_grads(model, crops, masks, packed: bool):
    crops = [c.clone().requires_grad_(True) for c in crops]
    if packed:
        outputs = model.forward_features(crops, masks)
    else:
        outputs = [model.forward_features(c, m) for c, m in zip(crops, masks)]
    # A fixed random projection of every output, so each output element gets its own weight.
    generator = torch.Generator().manual_seed(7)
    loss = sum(
        (out[key] * torch.randn(out[key].shape, generator=generator)).sum()
        for out in outputs for key in OUTPUT_KEYS if out[key].numel()
    )
    loss.backward()
    return outputs, [c.grad for c in crops]


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_mask"])
@pytest.mark.parametrize("registers", [0, 4])
def test_packed_forward_equals_crop_by_crop(backend, registers):
    model = _visible_tiny(img_size=42, num_register_tokens=registers).eval()
    model.set_attention_backend(backend)
    torch.manual_seed(1)
    crops = [torch.randn(2, 3, 42, 42), torch.randn(3, 3, 28, 28)]
    ibot_mask = torch.rand(2, 9) < 0.4
    ibot_mask[0, 0] = True  # at least one masked patch
    masks = [ibot_mask, None]

    packed, packed_grads = _outputs_and_input_grads(model, crops, masks, packed=True)
    single, single_grads = _outputs_and_input_grads(model, crops, masks, packed=False)
    for crop_index, (p, s) in enumerate(zip(packed, single)):
        for key in OUTPUT_KEYS:
            assert p[key].shape == s[key].shape, (crop_index, key)
            if p[key].numel():
                assert torch.allclose(p[key], s[key], atol=1e-5, rtol=0), (crop_index, key, (p[key] - s[key]).abs().max())
    for pg, sg in zip(packed_grads, single_grads):
        assert pg.abs().max() > 1e-3  # the gradient is real, not vanishing
        assert torch.allclose(pg, sg, atol=1e-5, rtol=0), (pg - sg).abs().max()
    assert packed[0]["x_norm_patchtokens"].shape == (2, 9, 192)
    assert packed[0]["x_norm_regtokens"].shape == (2, registers, 192)


def test_packed_crops_do_not_see_each_other_and_mask_matters():
    model = _visible_tiny(img_size=28).eval()
    torch.manual_seed(2)
    a, b = torch.randn(1, 3, 28, 28), torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        first = model.forward_features([a, b])[0]["x_norm_clstoken"]
        second = model.forward_features([a, torch.randn_like(b)])[0]["x_norm_clstoken"]
        masked = model.forward_features([a, b], [torch.ones(1, 4, dtype=torch.bool), None])[0]["x_norm_clstoken"]
    assert torch.allclose(first, second, atol=1e-6)
    assert (first - masked).abs().max() > 1e-2


# ---- input sizes and bands -----------------------------------------------------------------
def test_any_multiple_of_patch_size_and_other_band_counts():
    model = _visible_tiny(img_size=56, depth=2, in_chans=6).eval()
    with torch.no_grad():
        for height, width in [(28, 42), (70, 56), (14, 14), (56, 56)]:
            out = model.forward_features(torch.randn(1, 6, height, width))
            assert out["x_norm_patchtokens"].shape == (1, (height // 14) * (width // 14), 192)
            assert torch.isfinite(out["x_norm_patchtokens"]).all()
    # At the native size the pos-embed is used as is; elsewhere it is resampled to the new grid.
    assert model.interpolate_pos_encoding(56, 56, torch.float32).data_ptr() == model.pos_embed.data_ptr()
    assert model.interpolate_pos_encoding(28, 70, torch.float32).shape == (1, 1 + 2 * 5, 192)
    with pytest.raises(ValueError, match="30x42"):
        model(torch.randn(1, 6, 30, 42))
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(1, 3, 28, 28))


# ---- intermediate layers -------------------------------------------------------------------------
def test_get_intermediate_layers():
    model = _visible_tiny(img_size=42, depth=3, num_register_tokens=4).eval()
    x = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, 2, reshape=True, return_class_token=True, norm=True)
        features = model.forward_features(x)
        by_index = model.get_intermediate_layers(x, [0, 2], norm=False)
    assert len(layers) == 2
    for patches, cls in layers:
        assert patches.shape == (2, 192, 3, 4) and cls.shape == (2, 192)
    last_patches, last_cls = layers[-1]
    assert torch.allclose(last_patches.flatten(2).transpose(1, 2), features["x_norm_patchtokens"], atol=1e-6)
    assert torch.allclose(last_cls, features["x_norm_clstoken"], atol=1e-6)
    assert torch.allclose(by_index[1], features["x_prenorm"][:, 5:], atol=1e-6)
    assert not torch.allclose(by_index[0], by_index[1])
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, [3])


# ---- stochastic depth -------------------------------------------------------------------------------
def _block(drop_path: float, mode: str = "efficient") -> Block:
    torch.manual_seed(3)
    return Block(dim=32, num_heads=4, init_values=1.0, drop_path=drop_path, stochastic_depth=mode)


def test_stochastic_depth_is_off_in_eval():
    model = _visible_tiny(img_size=28, depth=4, drop_path_rate=0.4, drop_path_uniform=True).eval()
    reference = build_vit("vit_tiny", img_size=28, depth=4, init_values=1.0, drop_path_rate=0.0).eval()
    reference.load_state_dict(model.state_dict())
    crops = [torch.randn(4, 3, 28, 28), torch.randn(6, 3, 14, 14)]
    with torch.no_grad():
        first, second, plain = model(crops), model(crops), reference(crops)
    for f, s, p in zip(first, second, plain):
        assert torch.equal(f, s) and torch.equal(f, p)
    # ... and in training mode it does change the output (the eval check is not vacuous).
    model.train()
    with torch.no_grad():
        trained = model(crops)
    assert any(not torch.allclose(t, p) for t, p in zip(trained, plain))


def _only_branch(block: Block, keep: str) -> None:
    """Zero the other residual branch, so one branch's estimator is tested on its own: with
    both, the FFN sees a randomly perturbed input and the block output is not unbiased."""
    zero = lambda x, groups: torch.zeros_like(x)  # noqa: E731
    if keep == "attention":
        block.ffn_branch = zero
    else:
        block.attention_branch = zero


@pytest.mark.parametrize("mode", ["efficient", "droppath"])
@pytest.mark.parametrize("branch", ["attention", "ffn"])
def test_stochastic_depth_is_unbiased(mode, branch):
    block = _block(0.4, mode)
    _only_branch(block, branch)
    groups = [(10, 5), (6, 3)]
    torch.manual_seed(4)
    x = torch.randn(10 * 5 + 6 * 3, 32)
    with torch.no_grad():
        expected = block.eval()(x, groups)
        block.train()
        draws = torch.stack([block(x, groups) for _ in range(600)])
    mean, std = draws.mean(0), draws.std(0)
    # Each element's mean over n independent draws has standard error std/sqrt(n). A 6-sigma
    # bound per element (two-sided tail 2e-9, ~2e-6 over the 1,088 elements) cannot fail by
    # chance; 1e-5 covers float rounding where an element never varies.
    bound = 6 * std / len(draws) ** 0.5 + 1e-5
    assert ((mean - expected).abs() <= bound).all(), ((mean - expected).abs() / bound).max()
    # The bound is tight enough to catch a missing rescale (mean would be x + 0.6 * branch).
    unscaled = x + 0.6 * (expected - x)
    assert ((mean - unscaled).abs() > bound).any()


@pytest.mark.parametrize("mode", ["efficient", "droppath"])
def test_dropped_sequences_bypass_the_branch(mode, monkeypatch):
    block = _block(0.4, mode).train()
    groups = [(10, 4)]
    chosen: list[set[int]] = []
    if mode == "efficient":
        real_subset = block_module.sequence_subset

        def recording_subset(groups_, rate, device):
            index, kept_groups, scale = real_subset(groups_, rate, device)
            chosen.append({int(i) // 4 for i in index})
            return index, kept_groups, scale

        monkeypatch.setattr(block_module, "sequence_subset", recording_subset)
    else:
        real_mask = block_module.drop_path_mask

        def recording_mask(groups_, rate, device, dtype):
            mask = real_mask(groups_, rate, device, dtype)
            chosen.append({s for s in range(10) if mask[s * 4, 0] != 0})
            return mask

        monkeypatch.setattr(block_module, "drop_path_mask", recording_mask)

    for seed in range(100):  # find a draw where some sequence skips both branches
        torch.manual_seed(seed)
        chosen.clear()
        x = torch.randn(40, 32, requires_grad=True)
        out = block(x, groups)
        dropped = sorted(set(range(10)) - chosen[0] - chosen[1])
        if dropped and len(chosen[0]) < 10:
            break
    assert dropped, "no draw dropped a sequence from both branches"
    assert all(len(c) >= 1 for c in chosen)

    seq = dropped[0]
    rows = slice(seq * 4, seq * 4 + 4)
    assert torch.equal(out[rows], x[rows])
    # d out[seq] / d x is exactly the identity: the gradient of <out[seq], r> is r on seq, 0 elsewhere.
    projection = torch.randn(4, 32)
    (out[rows] * projection).sum().backward()
    expected = torch.zeros_like(x)
    expected[rows] = projection
    assert torch.equal(x.grad, expected)
    for name, param in block.named_parameters():
        assert param.grad is None or torch.count_nonzero(param.grad) == 0, name

    # Over a whole draw the branches do get gradient (the zero checks above can fail).
    block.zero_grad()
    block(x, groups).sum().backward()
    assert any(p.grad is not None and torch.count_nonzero(p.grad) for p in block.parameters())


# ---- attention backends ------------------------------------------------------------------------------
def test_backend_resolver_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("sdpa_mask", cpu) == "sdpa_mask"
    with pytest.raises(RuntimeError, match="xformers"):
        resolve_backend("xformers", cpu)
    with pytest.raises(RuntimeError, match="flex"):
        resolve_backend("flex", cpu)
    with pytest.raises(ValueError, match="nope"):
        resolve_backend("nope", cpu)
    model = build_vit("vit_tiny", depth=1, img_size=28)
    model.set_attention_backend("flex")
    with pytest.raises(RuntimeError, match="flex"):
        model(torch.randn(1, 3, 28, 28))


# ---- benchmark smoke test ---------------------------------------------------------------------------
@pytest.mark.slow
def test_benchmark_quick_smoke(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "backbone.py"
    # Timings end to end; memory through one probe only (each probe is a fresh interpreter).
    done = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1", "--skip-memory", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "backbone_cpu.json").read_text())
    assert {"machine", "settings", "timings", "ratios", "goals"} <= set(result)
    assert {"platform", "cpu_model", "cpu_cores", "torch", "device"} <= set(result["machine"])
    assert set(result["timings"]) == {
        "ours_forward", "timm_forward", "packed_fwd_bwd", "crop_by_crop_fwd_bwd", "efficient_sd_fwd_bwd", "droppath_fwd_bwd"}
    import statistics

    reps, fwd_batch = result["settings"]["reps"], result["settings"]["fwd_batch"]
    for timing in result["timings"].values():
        # Each figure is a summary of its own measurements, not a constant.
        assert len(timing["times_s"]) == reps and min(timing["times_s"]) > 0
        assert timing["median_s"] == statistics.median(timing["times_s"])
    ours = result["timings"]["ours_forward"]
    assert ours["images_per_s"] == pytest.approx(fwd_batch / ours["median_s"])
    pairs = {"ours_over_timm_throughput": ("timm_forward", "ours_forward"),
             "packed_over_crop_by_crop_time": ("packed_fwd_bwd", "crop_by_crop_fwd_bwd"),
             "efficient_sd_over_droppath_time": ("efficient_sd_fwd_bwd", "droppath_fwd_bwd")}
    assert set(result["ratios"]) == set(pairs)
    for key, (a, b) in pairs.items():
        assert result["ratios"][key] == pytest.approx(result["timings"][a]["median_s"] / result["timings"][b]["median_s"])

    probe = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1", "--memory-probe", "packed_fwd_bwd"],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    memory = json.loads(probe.stdout.strip().splitlines()[-1])
    # A lower bound the step cannot avoid: it allocates a gradient for every parameter (set to None
    # before the step). Measured: 26 MiB peak against 3.8 MiB of gradients.
    model = build_vit(result["settings"]["arch"], depth=result["settings"]["depth"], img_size=result["settings"]["img"])
    gradient_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert memory["hwm_reset"] in (True, False) and memory["peak_mib"] >= gradient_mib, (memory, gradient_mib)
