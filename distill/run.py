"""Builders that turn a distillation config into the loop's pieces (meta-arch, FSDP wrapping,
data stream, export) and hand them to ``dinov2_repro.train.loop.train``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dinov2_repro.distributed import DistributedEnv
from dinov2_repro.distributed.fsdp import _policy, device_mesh_for, full_state_dict, shard_modules
from dinov2_repro.backbone_file import save_backbone
from dinov2_repro.train.loop import train
from dinov2_repro.train.meta_arch import build_backbone
from dinov2_repro.train.pretrain import build_ssl_data

from .meta_arch import DistillMetaArch

EXPORT_DIR = Path("export")


def student_export_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / EXPORT_DIR / f"student_{name}_backbone.safetensors"


def build_distill_meta_arch(cfg: DictConfig) -> DistillMetaArch:
    return DistillMetaArch(cfg)


def fp32_policy():
    return _policy(None, True)


def wrap_distill_if_distributed(model: DistillMetaArch, cfg: DictConfig, env: DistributedEnv) -> DistillMetaArch:
    """FSDP2 like pretraining: the teacher with the teacher policies, each student with the
    student policies, each EMA backbone like its student (so the EMA meets matching shards)."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh_for(next(model.parameters()).device)
    precision = cfg.compute_precision
    common = dict(mesh=mesh, block_chunks=int(cfg.student.block_chunks), all_fp32=precision.param_dtype == "fp32")
    shard_modules(model.teacher, precision=precision.get("teacher", {}), **common)
    for name, student in model.students.items():
        shard_modules(student, precision=precision.get("student", {}), **common)
        for projection in ("cls_proj", "patch_proj"):  # feature distillation's heads: small, kept in fp32
            if projection in student:
                fully_shard(student[projection], mesh=mesh, mp_policy=fp32_policy(), reshard_after_forward=True)
        shard_modules(nn.ModuleDict({"backbone": model.ema[name]}), precision=precision.get("teacher", {}), **common)
    return model


def build_distill_data(cfg: DictConfig, start_iteration: int, env: DistributedEnv) -> Iterator[dict[str, Any]]:
    """The pretraining data stream with the teacher's patch size and band count, and no masks.
    Feature distillation resizes the teacher's input instead: the crops follow the students'
    patch size (config.attach_backbone_teacher checked that they fit every student)."""
    from .config import student_specs

    patch = int(cfg.distill.teacher_patch_size)
    if cfg.distill.get("method") == "features":
        patch = int(student_specs(cfg)[0].section.patch_size)
    data_cfg = OmegaConf.merge(cfg, {"student": {"patch_size": patch,
                                                 "in_chans": int(cfg.distill.teacher_in_chans)},
                                     "ibot": {"mask_sample_probability": 0.0}})
    return build_ssl_data(data_cfg, start_iteration, env)


def export_students(ema_backbones: nn.ModuleDict, run_dir: Path, cfg: DictConfig, env: DistributedEnv) -> list[Path]:
    """Collective: gathers each (possibly sharded) EMA backbone; rank 0 writes
    ``export/student_<name>_backbone.safetensors`` in the teacher export's format."""
    from .config import student_specs

    specs = {spec.name: spec for spec in student_specs(cfg)}
    paths = []
    for name, backbone in ema_backbones.items():
        spec = specs[name]
        state = full_state_dict(backbone)
        path = student_export_path(run_dir, name)
        if env.rank == 0:
            plain = build_backbone(spec.section, img_size=int(backbone.img_size), drop_path_rate=0.0)
            plain.load_state_dict(state)
            save_backbone(plain, path, arch=spec.section.arch, mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std),
                          extra_metadata={"distilled_from": str(cfg.distill.teacher)})
        paths.append(path)
    return paths


def run_distillation(cfg: DictConfig) -> dict[str, float]:
    """Run (or resume, from ``train.output_dir``) a distillation; returns the last logged metrics."""
    from dinov2_repro.train.validate import validate_train_config

    validate_train_config(cfg)  # the pretraining checks (lengths, crops, bands vs data) before any work
    return train(cfg, build_meta_arch=build_distill_meta_arch, build_data=build_distill_data, export=export_students,
                 wrap_model=wrap_distill_if_distributed)
