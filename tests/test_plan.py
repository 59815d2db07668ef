"""The planner against measurement on this machine.

- FLOPs: the planner's fake-tensor trace counts exactly what FlopCounterMode counts on one real
  CPU step of the same config and batch layout.
- Memory: the planner's predicted peak (live tensor bytes, traced on fake tensors over a fake
  process group) is within 20% of the peak measured on a real CPU step with real gloo FSDP2
  ranks (1 and 2; with and without activation checkpointing at 2). The measurement follows the
  storages that the real kernels, the real autograd graph and the real FSDP2 collectives
  allocate and free (``LiveBytes`` on real tensors): the quantity the planner predicts, measured
  on the real run. tracemalloc cannot see tensor memory (it tracks Python's allocator only);
  RSS mixes in the interpreter, libraries and allocator caching.
- Memory, independently: at 1 rank the planner's peak is compared with the CPU allocator's own
  record of a real step (``torch.profiler`` with ``profile_memory``: every allocation and free
  the c10 CPU allocator reports, summed in time order, plus the bytes of the tensors that exist
  before the step). No code of the planner is involved in that number. Measured: 20,654,024 vs
  20,653,976 bytes predicted without checkpointing, 14,675,088 vs 14,670,032 with it; the gap
  (48 B, 5 KB) is allocations that are not tensor storages the planner follows (6 KB are still
  held after the step). At 2 gloo ranks the profiler's record did not move with checkpointing
  although the live tensors did (gloo's own buffers), so the 2-rank checks use LiveBytes.
- Shards: the planner's per-rank parameter shard shapes at world size 2 are those of the real
  FSDP2 run.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2_repro.config import CONFIG_DIR, load_config
from dinov2_repro.distributed import shutdown_distributed

TOLERANCE = 0.20


def plan_cfg(activation_checkpointing: str = "none"):
    # Big enough that activations, not allocator odds and ends, dominate; small enough for 2 cores.
    return load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        "student.arch=vit_micro", "student.drop_path_rate=0.3", "crops.global_crops_size=56", "crops.local_crops_size=28",
        "crops.local_crops_number=4", "train.batch_size_per_gpu=8", "compute_precision.param_dtype=fp32",
        f"train.activation_checkpointing={activation_checkpointing}", "student.block_chunks=0",
        *[f"{k}.head_n_prototypes=256" for k in ("dino", "ibot")], *[f"{k}.head_hidden_dim=128" for k in ("dino", "ibot")],
        *[f"{k}.head_bottleneck_dim=64" for k in ("dino", "ibot")],
    ])


def real_batch(cfg, seed: int):
    from dinov2_repro.plan.trace import planning_batch

    batch = planning_batch(cfg, batch_size=cfg.train.batch_size_per_gpu)
    g = torch.Generator().manual_seed(seed)
    for key in ("collated_global_crops", "collated_local_crops"):
        batch[key] = torch.randn(batch[key].shape, generator=g)
    return batch


VALUES = {"teacher_temp": 0.07, "mom": 0.99}


def _train_step(model, optimizer, batch) -> None:
    loss, _ = model.compute_losses(batch, VALUES)
    loss.backward()
    del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_step(*, shard: bool, activation_checkpointing: str, rank: int = 0) -> dict:
    """Peak tensor bytes of the second real CPU step (after the AdamW states exist)."""
    from dinov2_repro.distributed.fsdp import shard_meta_arch
    from dinov2_repro.plan.trace import LiveBytes
    from dinov2_repro.train.meta_arch import SSLMetaArch

    cfg = plan_cfg(activation_checkpointing)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    if shard:
        model = shard_meta_arch(model, cfg, torch.device("cpu"))
    model.train()
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-4, foreach=True)
    batch = real_batch(cfg, seed=rank)
    _train_step(model, optimizer, batch)  # creates the AdamW states, like the planner's warm-up
    live = LiveBytes()
    for tensors in (model.parameters(), model.buffers(), batch.values(),
                    (t for state in optimizer.state.values() for t in state.values())):
        live.add_existing(tensors)
    with live:
        _train_step(model, optimizer, batch)
    shapes = {name: tuple(getattr(p, "_local_tensor", p).shape) for name, p in model.student.named_parameters()}
    return {"peak": live.peak, "shapes": shapes}


def _modes(world_size: int) -> tuple[str, ...]:
    # Checkpointing is measured at 2 ranks only: the 2-minute test budget.
    return ("none", "blocks") if world_size == 2 else ("none",)


def _worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    results = {mode: measure_step(shard=True, activation_checkpointing=mode, rank=rank)
               for mode in _modes(world_size)}
    if rank == 0:
        torch.save(results, out)
    shutdown_distributed()


def _measured(tmp_path: Path, world_size: int) -> dict:
    out = tmp_path / f"measured_{world_size}.pt"
    mp.start_processes(_worker, args=(world_size, str(tmp_path / f"init{world_size}"), str(out)),
                       nprocs=world_size, start_method="spawn")
    return torch.load(out)


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def allocator_peak_of_a_real_step(cfg) -> int:
    """Peak CPU bytes of the second real step by the allocator's record (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from dinov2_repro.train.meta_arch import SSLMetaArch

    torch.manual_seed(0)
    model = SSLMetaArch(cfg).train()
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-4, foreach=True)
    batch = real_batch(cfg, seed=0)
    _train_step(model, optimizer, batch)  # creates the AdamW states, like the planner's warm-up
    before = _storage_bytes([*model.parameters(), *model.buffers(), *batch.values(),
                             *(t for state in optimizer.state.values() for t in state.values())])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _train_step(model, optimizer, batch)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:  # +bytes on allocation, -bytes on free
        running += event.nbytes()
        peak = max(peak, running)
    return before + peak


@pytest.mark.slow
def test_planner_peak_matches_the_allocator_record_of_a_real_cpu_step(one_torch_thread):
    from dinov2_repro.plan.trace import trace_step

    measured = {}
    for mode in ("none", "blocks"):
        cfg = plan_cfg(mode)
        planned = trace_step(cfg, world_size=1, shard=False).peak_bytes
        measured[mode] = allocator_peak_of_a_real_step(cfg)
        assert abs(planned - measured[mode]) <= 0.01 * measured[mode], (mode, planned, measured[mode])
    # The independent measure sees what checkpointing saves (measured: 29%).
    assert measured["blocks"] < 0.85 * measured["none"], measured


def test_planner_flops_equal_a_real_cpu_step(one_torch_thread):
    from dinov2_repro.plan.trace import flop_counter, trace_step
    from dinov2_repro.train.meta_arch import SSLMetaArch

    cfg = plan_cfg()
    planned = trace_step(cfg, world_size=1, shard=False)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    model.train()
    with flop_counter() as counter:
        loss, _ = model.compute_losses(real_batch(cfg, seed=0), VALUES)
        loss.backward()
    assert planned.flops["total"] == counter.get_total_flops() > 0
    parts = planned.flops
    assert parts["student_forward"] + parts["teacher_forward"] + parts["student_backward"] == parts["total"]
    assert 0 < parts["teacher_forward"] < parts["student_forward"] < parts["student_backward"]
    # Efficient stochastic depth at 0.3 keeps int(0.7 n) of each run of n sequences.
    assert 0.6 < planned.kept_fraction < 0.75


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_planner_memory_matches_measured_cpu_peak(tmp_path, world_size):
    from dinov2_repro.plan.trace import trace_step

    measured = _measured(tmp_path, world_size)
    for mode in _modes(world_size):
        planned = trace_step(plan_cfg(mode), world_size=world_size)
        real = measured[mode]["peak"]
        error = abs(planned.peak_bytes - real) / real
        assert error < TOLERANCE, f"{mode}, {world_size} rank(s): planned {planned.peak_bytes} vs measured {real} ({error:.1%})"
        if world_size == 2:
            assert planned.student_shard_shapes == measured[mode]["shapes"]
    if world_size == 2:  # checkpointing must show up in the measurement: fewer bytes at the peak
        assert measured["blocks"]["peak"] < 0.9 * measured["none"]["peak"]
