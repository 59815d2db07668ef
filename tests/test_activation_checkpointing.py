"""Activation checkpointing (train.activation_checkpointing) changes memory, not maths: with
packing (global + local crops in one sequence), efficient stochastic depth on (random subsets,
which recomputation must redraw identically) and FSDP2 over 2 gloo ranks, loss and gradients
equal those without it."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2_repro.config import CONFIG_DIR, load_config
from dinov2_repro.distributed import shutdown_distributed

MODES = ("none", "blocks", "every_k")


def tiny_cfg(mode: str = "none", *extra: str):
    return load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        "student.arch=vit_micro", "student.drop_path_rate=0.4", "crops.global_crops_size=28", "crops.local_crops_size=14",
        "crops.local_crops_number=2", "train.batch_size_per_gpu=4", "compute_precision.param_dtype=fp32",
        f"train.activation_checkpointing={mode}", "train.activation_checkpointing_every=2",
        *[f"{k}.head_n_prototypes=64" for k in ("dino", "ibot")], *[f"{k}.head_hidden_dim=64" for k in ("dino", "ibot")],
        *[f"{k}.head_bottleneck_dim=32" for k in ("dino", "ibot")], *extra,
    ])


def random_batch(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """The planner's batch layout (expected number of masked tokens), filled with random pixels."""
    from dinov2_repro.plan.trace import planning_batch

    batch = planning_batch(cfg, batch_size=cfg.train.batch_size_per_gpu)
    g = torch.Generator().manual_seed(seed)
    for key in ("collated_global_crops", "collated_local_crops"):
        batch[key] = torch.randn(batch[key].shape, generator=g)
    return batch


def loss_and_grads(model, batch, step_seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    torch.manual_seed(step_seed)  # the stochastic-depth subsets of this step
    loss, _ = model.compute_losses(batch, {"teacher_temp": 0.05, "mom": 0.99})
    loss.backward()
    grads = {}
    for name, param in model.student.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return loss.detach(), grads


def _build(mode: str, shard: bool):
    from dinov2_repro.distributed.fsdp import shard_meta_arch
    from dinov2_repro.train.meta_arch import SSLMetaArch

    cfg = tiny_cfg(mode)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    return (shard_meta_arch(model, cfg, torch.device("cpu")) if shard else model), cfg


def _assert_same(reference, other, label: str) -> None:
    (loss_ref, grads_ref), (loss, grads) = reference, other
    assert torch.equal(loss, loss_ref), f"{label}: loss {float(loss)} != {float(loss_ref)}"
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ref[name], rtol=1e-6, atol=1e-7), f"{label}: gradient of {name} differs"


def test_checkpointing_keeps_loss_and_gradients_one_process(one_torch_thread):
    results = {}
    for mode in MODES:
        model, cfg = _build(mode, shard=False)
        results[mode] = loss_and_grads(model, random_batch(cfg))
    for mode in MODES[1:]:
        _assert_same(results["none"], results[mode], mode)
    # The test is only meaningful if stochastic depth dropped something and every part learns.
    assert any(g.abs().sum() > 0 for k, g in results["none"][1].items() if "blocks.0." in k)


def test_checkpointing_rejects_unknown_mode():
    from dinov2_repro.models import build_vit

    model = build_vit("vit_micro")
    with pytest.raises(ValueError, match="sometimes"):
        model.set_activation_checkpointing("sometimes")
    model.set_activation_checkpointing("every_k", every=3)
    assert model.checkpointed_blocks == {0, 3}


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    for mode in ("none", "blocks"):
        model, cfg = _build(mode, shard=True)
        results[mode] = loss_and_grads(model, random_batch(cfg, seed=rank), step_seed=1 + rank)
    if rank == 0:
        torch.save(results, out)
    shutdown_distributed()


@pytest.mark.slow
def test_checkpointing_keeps_loss_and_gradients_two_fsdp_ranks(tmp_path):
    out = str(tmp_path / "results.pt")
    mp.start_processes(_worker, args=(str(tmp_path / "init"), out), nprocs=2, start_method="spawn")
    results = torch.load(out)
    _assert_same(results["none"], results["blocks"], "blocks under FSDP2")
