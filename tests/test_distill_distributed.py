"""Distillation under FSDP2 with real gloo processes: a 2-rank step (each rank holding half the
batch) gives the loss and the student gradients of a 1-rank step on the whole batch, with
Sinkhorn-Knopp centering (reduced across ranks) and a separate iBOT head.

KoLeo is excluded (weight 0): the recipe computes it per rank, so it legitimately differs."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2_repro.distributed import shutdown_distributed
from test_distill import distill_cfg, write_teacher_checkpoint

BATCH = 4  # global batch; 2 images per rank
N_LOCAL = 2


def _cfg(teacher, tmp):
    return distill_cfg(teacher, tmp / "out", tmp, "dino.koleo_loss_weight=0.0", "train.centering=sinkhorn_knopp",
                       "distill.students=[vit_micro,{arch: vit_micro, name: r1, num_register_tokens: 1}]")


def _batch(images: slice):
    g = torch.Generator().manual_seed(0)
    globals_ = torch.randn(2, BATCH, 3, 28, 28, generator=g)  # crop, image, ...
    locals_ = torch.randn(N_LOCAL, BATCH, 3, 14, 14, generator=g)
    return {"collated_global_crops": globals_[:, images].reshape(-1, 3, 28, 28),
            "collated_local_crops": locals_[:, images].reshape(-1, 3, 14, 14)}


def _step(model, batch):
    loss, _ = model.compute_losses(batch, {"teacher_temp": 0.05})
    loss.backward()
    grads = {}
    for name, param in model.students.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return loss.detach(), grads


def _worker(rank: int, init_file: str, teacher: str, tmp: str, out: str) -> None:
    from pathlib import Path

    from dinov2_repro.distill.meta_arch import DistillMetaArch
    from dinov2_repro.distill.run import wrap_distill_if_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = _cfg(teacher, Path(tmp))
    model = wrap_distill_if_distributed(DistillMetaArch(cfg), cfg, None)
    loss, grads = _step(model, _batch(slice(rank * 2, rank * 2 + 2)))
    total = loss.clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / 2, "grads": grads}, out)
    shutdown_distributed()


@pytest.mark.slow
def test_two_rank_step_equals_one_rank_step(tmp_path):
    from dinov2_repro.distill.meta_arch import DistillMetaArch

    teacher = write_teacher_checkpoint(tmp_path / "teacher", "train.centering=sinkhorn_knopp", "ibot.separate_head=true")
    (tmp_path / "img").mkdir()
    out = str(tmp_path / "two_ranks.pt")
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(teacher), str(tmp_path / "img"), out),
                       nprocs=2, start_method="spawn")
    two = torch.load(out)

    loss, grads = _step(DistillMetaArch(_cfg(teacher, tmp_path / "img")), _batch(slice(0, BATCH)))
    assert torch.allclose(two["loss"], loss, rtol=1e-5, atol=1e-6), (float(two["loss"]), float(loss))
    assert grads.keys() == two["grads"].keys() and any(k.startswith("r1.") for k in grads)
    worst = max(float((two["grads"][k] - g).abs().max() / (g.abs().max() + 1e-12)) for k, g in grads.items())
    assert worst < 1e-4, f"largest relative gradient difference {worst:.2e}"
    assert all(grads[f"{s}.ibot_head.mlp.0.weight"].abs().sum() > 0 for s in ("vit_micro", "r1"))
