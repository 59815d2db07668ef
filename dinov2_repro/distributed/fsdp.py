"""FSDP2 sharding of the student and the teacher with per-module mixed precision.

Each backbone is sharded by groups of blocks (``student.block_chunks`` groups; one block per
group when 0), then its root (embeddings, final norm); every head is its own unit. Policies
come from ``compute_precision.<student|teacher>.<backbone|dino_head|ibot_head>``: parameters
are kept in fp32 (the master weights) and cast to ``param_dtype`` for compute; gradients are
reduced in ``reduce_dtype`` (fp32 for the student heads, for stability). With
``compute_precision.param_dtype: fp32`` every policy is fp32 (exact CPU tests).

The teacher is sharded like the student, so the EMA runs shard by shard on local tensors.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from ..device import DTYPES
from .env import DistributedEnv

logger = logging.getLogger("dinov2_repro")


def _policy(section: DictConfig | None, all_fp32: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if all_fp32 or section is None:
        return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=DTYPES[section.param_dtype], reduce_dtype=DTYPES[section.reduce_dtype])


def block_groups(blocks: nn.ModuleList, chunks: int) -> list[list[nn.Module]]:
    """Split the blocks into ``chunks`` contiguous groups (one block per group when chunks <= 0)."""
    blocks = list(blocks)
    if chunks <= 0 or chunks >= len(blocks):
        return [[block] for block in blocks]
    size = -(-len(blocks) // chunks)
    return [blocks[i : i + size] for i in range(0, len(blocks), size)]


def shard_meta_arch(model: nn.Module, cfg: DictConfig, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    all_fp32 = cfg.compute_precision.param_dtype == "fp32"
    for side in ("student", "teacher"):
        modules: nn.ModuleDict = getattr(model, side)
        precision = cfg.compute_precision.get(side, {})
        backbone_policy = _policy(precision.get("backbone"), all_fp32)
        for group in block_groups(modules.backbone.blocks, int(cfg.student.block_chunks)):
            fully_shard(group if len(group) > 1 else group[0], mesh=mesh, mp_policy=backbone_policy,
                        reshard_after_forward=True)
        # Roots too: FSDP2 keeps a root unsharded after forward by default, and the teacher has no
        # backward to reshard it, so the EMA would meet full tensors on one side and shards on the other.
        fully_shard(modules.backbone, mesh=mesh, mp_policy=backbone_policy, reshard_after_forward=True)
        for head in ("dino_head", "ibot_head"):
            if head in modules:
                fully_shard(modules[head], mesh=mesh, mp_policy=_policy(precision.get(head), all_fp32),
                            reshard_after_forward=True)
    logger.info("FSDP2: sharded student and teacher over %d ranks", dist.get_world_size())
    return model


def wrap_meta_arch_if_distributed(model: nn.Module, cfg: DictConfig, env: DistributedEnv) -> nn.Module:
    """Shard with FSDP2 whenever a process group exists (world size 1 included); a plain
    single process trains unsharded."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    return shard_meta_arch(model, cfg, next(model.parameters()).device)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameter/gradient), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of ``module`` on CPU. Collective under FSDP: every rank calls it
    (with cpu_offload, only rank 0 receives the tensors)."""
    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
