"""Trace one real training step of a config on fake tensors: FLOPs per part and live memory.

Nothing here is a hand formula: the real meta-arch is built (parameters are FakeTensors, so a
ViT-g costs no memory), sharded with the real FSDP2 code over a *fake* process group of the
planned world size, and one real step (teacher forward, packed student forward with efficient
stochastic depth, heads, losses, backward, AdamW) runs under two dispatch modes:

- ``PartFlops`` counts the matmul/conv/attention FLOPs with FlopCounterMode's formulas, forward
  and backward separately, per part (teacher, student heads; the CPU flash-attention kernels
  that fake tensors dispatch to get formulas here, torch only ships the CUDA ones);
- ``LiveBytes`` follows every tensor storage that the step creates and frees and records the
  peak of the bytes alive, which is what the caching allocator of a GPU has to hold at least.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from typing import Any, Callable, Iterator
from unittest import mock

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _sdpa_cpu_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU attention kernels (same formula as the CUDA ones)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


class PartFlops(TorchDispatchMode):
    """FLOPs (FlopCounterMode's formulas) in total and per named part of the model.

    A part is "active" while one of its modules runs forward (forward hooks) or backward (full
    backward hooks). FlopCounterMode's own per-module attribution is not used: its module
    tracker keeps the tensors recomputed by activation checkpointing alive through backward,
    which would falsify the memory trace that runs in the same pass."""

    def __init__(self, parts: dict[str, list[nn.Module]], *, backward_parts: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.total = 0
        self.by_part = {name: 0 for name in parts}
        self._active: dict[str, int] = {name: 0 for name in parts}
        self._registry = flop_counter().flop_registry
        self._handles = []
        for name, modules in parts.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(functools.partial(self._enter, name)))
                self._handles.append(module.register_forward_hook(functools.partial(self._exit, name), always_call=True))
                if name in backward_parts:
                    self._handles.append(module.register_full_backward_pre_hook(functools.partial(self._enter, name)))
                    self._handles.append(module.register_full_backward_hook(functools.partial(self._exit, name)))

    def _enter(self, name: str, *args: Any) -> None:
        self._active[name] += 1

    def _exit(self, name: str, *args: Any) -> None:
        self._active[name] -= 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        counter = self._registry.get(func._overloadpacket)
        if counter is not None:
            flops = counter(*args, **kwargs, out_val=out)
            self.total += flops
            for name, depth in self._active.items():
                if depth > 0:
                    self.by_part[name] += flops
        return out

    def snapshot(self) -> dict[str, int]:
        return {"total": self.total, **self.by_part}


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, updated on every op; ``peak`` is the high-water mark.

    Storages that exist before the mode starts are added with ``add_existing``. DTensor (FSDP2)
    outputs are followed through their local tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def _storage(self, t: Tensor):
        local = getattr(t, "_local_tensor", None)
        if local is not None:
            t = local
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None

    def _track(self, t: Tensor) -> None:
        storage = self._storage(t)
        if storage is None:
            return
        key = id(storage)
        if key in self._seen:
            return
        size = storage.nbytes()
        self._seen[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def add_existing(self, tensors: Iterator[Tensor]) -> None:
        for t in tensors:
            if isinstance(t, Tensor):
                self._track(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._track(t)
        return out


@dataclasses.dataclass(kw_only=True)
class StepTrace:
    """What one traced step measured, per GPU (FLOPs are per GPU per step)."""
    world_size: int
    batch_size_per_gpu: int
    flops: dict[str, int]            # teacher_forward, student_forward/backward, student_heads_*, total
    kept_fraction: float             # student block tokens computed / tokens without stochastic depth
    n_masked_tokens: int
    student_param_bytes: int         # local shards (fp32 master)
    teacher_param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    persistent_bytes: int            # alive before the step: shards, states, buffers, batch
    activation_bytes: int            # alive at the end of forward beyond the persistent bytes
    peak_bytes: int                  # high-water mark over forward, backward and optimizer step
    unit_param_counts: list[int]     # unsharded parameters per FSDP unit (for the compute-dtype copies)
    student_shard_shapes: dict[str, tuple[int, ...]]  # local shard shape of every student parameter


def planning_batch(cfg: DictConfig, *, batch_size: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """A batch of the configured crop shapes with the *expected* number of iBOT-masked tokens:
    int(2B * mask_sample_probability) masked images at the mean of mask_ratio_min_max."""
    patch = cfg.student.patch_size
    g, l_size, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    grid = (g // patch) ** 2
    n_images = 2 * batch_size
    low, high = cfg.ibot.mask_ratio_min_max
    n_masked = round(int(n_images * cfg.ibot.mask_sample_probability) * grid * (low + high) / 2)
    masks = torch.zeros(n_images * grid, dtype=torch.bool, device=device)
    masks[:n_masked] = True
    return {
        "collated_global_crops": torch.zeros(n_images, cfg.student.in_chans, g, g, device=device),
        "collated_local_crops": torch.zeros(n_local * batch_size, cfg.student.in_chans, l_size, l_size, device=device),
        "collated_masks": masks.reshape(n_images, grid),
        "mask_indices_list": torch.arange(n_masked, device=device),
        "masks_weight": torch.ones(n_masked, device=device),
        "n_masked_patches": torch.tensor([n_masked]),
    }


@contextlib.contextmanager
def _fake_process_group(world_size: int) -> Iterator[Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("the planner needs its own (fake) process group; run it outside a distributed job")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def _kept_tokens_counter(model: nn.Module) -> tuple[list[int], Callable[[], None]]:
    """Count tokens entering the student's residual branches vs. the tokens of their blocks
    (efficient stochastic depth runs each branch on a subset of the sequences)."""
    from ..models.layers import Block

    seen = [0, 0]
    handles = []

    def on_block(module: nn.Module, args: tuple) -> None:
        seen[1] += 2 * sum(count * length for count, length in args[1])

    def on_branch(module: nn.Module, args: tuple) -> None:
        seen[0] += args[0].shape[0]

    for block in (m for m in model.trainable().modules() if isinstance(m, Block)):
        handles.append(block.register_forward_pre_hook(on_block))
        handles += [branch.register_forward_pre_hook(on_branch) for branch in (block.attn, block.mlp)]
    return seen, lambda: [h.remove() for h in handles]


def _local_bytes(tensors: Iterator[Tensor]) -> int:
    from ..distributed.fsdp import local_tensor

    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)


def _fsdp_unit_sizes(model: nn.Module) -> list[int]:
    """Unsharded parameter count of every FSDP2 unit (its own parameters, not nested units')."""
    from torch.distributed.fsdp import FSDPModule

    sizes = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                sizes.append(sum(fsdp_param._orig_size.numel() for fsdp_param in group.fsdp_params))
    return sizes


def trace_step(cfg: DictConfig, *, world_size: int, build_meta_arch: Callable[[DictConfig], nn.Module] | None = None,
               shard_meta_arch: Callable[[nn.Module, DictConfig], nn.Module] | None = None,
               shard: bool = True) -> StepTrace:
    """Run one step of ``cfg`` on fake tensors as rank 0 of ``world_size`` FSDP2 ranks
    (``shard=False``: the unsharded single-process model). ``build_meta_arch`` and
    ``shard_meta_arch`` default to SSL pretraining's; distillation passes its own."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..distributed.fsdp import shard_meta_arch as shard_ssl
    from ..models.heads import DINOHead
    from ..train.loop import autocast_for
    from ..train.meta_arch import SSLMetaArch

    build = build_meta_arch or SSLMetaArch
    shard_fn = shard_meta_arch or (lambda model, config: shard_ssl(model, config, torch.device("cpu")))
    batch_size = int(cfg.train.batch_size_per_gpu)
    values = {"teacher_temp": float(cfg.teacher.teacher_temp), "mom": float(cfg.teacher.momentum_teacher)}
    device = torch.device("cpu")
    with (_fake_process_group(world_size) if shard else contextlib.nullcontext()) as mesh, FakeTensorMode():
        # Initial values do not matter on fake tensors, and trunc_normal_ reads data (mask.any()).
        with mock.patch("torch.nn.init.trunc_normal_", lambda t, *a, **k: t):
            model = build(cfg)
        if shard:
            with mock.patch("torch.distributed.device_mesh.init_device_mesh", lambda *a, **k: mesh):
                model = shard_fn(model, cfg)
        student = model.trainable()
        optimizer = torch.optim.AdamW(student.parameters(), lr=0.0, foreach=True)
        for p in student.parameters():  # AdamW states exist after the first real step: create them
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        batch = planning_batch(cfg, batch_size=batch_size, device=device)
        model.train()

        live = LiveBytes()
        states = [t for state in optimizer.state.values() for t in state.values()]
        for group in (model.parameters(), model.buffers(), states, batch.values()):
            live.add_existing(group)
        persistent = live.live
        kept, remove_hooks = _kept_tokens_counter(model)
        heads = [m for m in student.modules() if isinstance(m, DINOHead)]
        counter = PartFlops({"teacher": list(model.teacher.children()), "student_heads": heads},
                            backward_parts=("student_heads",))
        with live:
            with counter:
                with autocast_for(cfg, device)():
                    loss, _ = model.compute_losses(batch, values)
                forward = counter.snapshot()
                kept_tokens = list(kept)  # recomputation under activation checkpointing calls the hooks again
                activations = live.live - persistent
                loss.backward()
                del loss
            backward = {key: value - forward[key] for key, value in counter.snapshot().items()}
            grad_bytes = _local_bytes(p.grad for p in student.parameters() if p.grad is not None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        counter.remove()
        remove_hooks()
        unit_sizes = _fsdp_unit_sizes(model) if shard else []
        student_bytes, teacher_bytes = _local_bytes(student.parameters()), _local_bytes(model.teacher.parameters())
        shard_shapes = {name: tuple(getattr(p, "_local_tensor", p).shape) for name, p in student.named_parameters()}
        state_bytes = _local_bytes(t for t in states if t.dim() > 0)
    flops = {
        "teacher_forward": forward["teacher"],
        "student_forward": forward["total"] - forward["teacher"],
        "student_backward": backward["total"],
        "student_heads_forward": forward["student_heads"],
        "student_heads_backward": backward["student_heads"],
        "total": forward["total"] + backward["total"],
    }
    return StepTrace(
        world_size=world_size if shard else 1, batch_size_per_gpu=batch_size, flops=flops,
        kept_fraction=kept_tokens[0] / max(kept_tokens[1], 1), n_masked_tokens=int(batch["mask_indices_list"].shape[0]),
        student_param_bytes=student_bytes, teacher_param_bytes=teacher_bytes, grad_bytes=grad_bytes,
        optimizer_state_bytes=state_bytes, persistent_bytes=persistent, activation_bytes=activations,
        peak_bytes=live.peak, unit_param_counts=unit_sizes, student_shard_shapes=shard_shapes,
    )
