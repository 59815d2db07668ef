"""Planning a distillation job: one frozen teacher forward, then a step of every student.

The real ``distill`` meta-arch is traced. A planning machine has no teacher checkpoint, so the
teacher is described by its *training* config (``--teacher-config configs/train/vitg14.yaml``):
the checkpoint-reading steps of the distill code (``attach_teacher``, ``build_teacher``) are
replaced by stand-ins that take the architecture and head sizes from that config; everything
else (students, EMA copies, losses, FSDP2 wrapping) is distillation's own code.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Sequence
from unittest import mock

from omegaconf import DictConfig
from torch import nn

from ..config import ConfigError, load_config

_HEAD_KEYS = ("head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim")


def is_distill_config(config_file: str | Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load(Path(config_file).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False  # load_config reports unreadable files with the file name
    return isinstance(data, dict) and "distill" in data


def _attach_planning_teacher(teacher_cfg: DictConfig) -> Callable[[DictConfig], DictConfig]:
    def attach(cfg: DictConfig) -> DictConfig:
        if cfg.distill.method == "features":  # a backbone-only teacher: no heads to copy
            import torch

            from ..train.meta_arch import build_backbone

            with torch.device("meta"):
                backbone = build_backbone(teacher_cfg.student, img_size=teacher_cfg.student.patch_size, drop_path_rate=0.0)
            cfg.distill.teacher_arch = str(teacher_cfg.student.arch)
            cfg.distill.teacher_patch_size = int(backbone.patch_size)
            cfg.distill.teacher_embed_dim = int(backbone.embed_dim)
            cfg.distill.teacher_in_chans = int(teacher_cfg.student.in_chans)
            return cfg
        # What attach_teacher copies from a checkpoint's config, taken from the teacher's YAML.
        for section in ("dino", "ibot"):
            for key in _HEAD_KEYS:
                cfg[section][key] = teacher_cfg[section][key]
        cfg.ibot.separate_head = bool(teacher_cfg.ibot.separate_head)
        cfg.distill.teacher_arch = str(teacher_cfg.student.arch)
        cfg.distill.teacher_patch_size = int(teacher_cfg.student.patch_size)
        return cfg
    return attach


def _planning_teacher(teacher_cfg: DictConfig) -> Callable[..., tuple[nn.ModuleDict, DictConfig]]:
    def build_teacher(checkpoint: str, *, attention_backend: str = "auto") -> tuple[nn.ModuleDict, DictConfig]:
        from ..train.meta_arch import build_student_and_teacher

        _, teacher = build_student_and_teacher(teacher_cfg)
        return teacher.eval(), teacher_cfg
    return build_teacher


def _fake_safe_deepcopy(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """deepcopy whose tensors are made in the active (fake) mode: deepcopy of a FakeTensor
    would create a second fake mode, which FSDP then refuses to mix with the first."""
    import copy

    import torch

    memo = dict(memo or {})
    for tensor in [*module.parameters(), *module.buffers()]:
        fresh = torch.empty_like(tensor)
        memo[id(tensor)] = nn.Parameter(fresh, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else fresh
    return copy.deepcopy(module, memo)


def _planning_backbone_teacher(teacher_cfg: DictConfig) -> Callable[..., nn.ModuleDict]:
    def build_backbone_teacher(path: str, *, attention_backend: str = "auto") -> nn.ModuleDict:
        from ..train.meta_arch import build_backbone

        backbone = build_backbone(teacher_cfg.student, img_size=teacher_cfg.crops.global_crops_size, drop_path_rate=0.0,
                                  attn_backend=attention_backend)
        return nn.ModuleDict({"backbone": backbone.requires_grad_(False)}).eval()
    return build_backbone_teacher


@contextlib.contextmanager
def _planning_teacher_patches(teacher_cfg: DictConfig) -> Iterator[None]:
    with mock.patch("dinov2_repro.distill.config.attach_teacher", _attach_planning_teacher(teacher_cfg)), \
            mock.patch("dinov2_repro.distill.meta_arch.build_teacher", _planning_teacher(teacher_cfg)), \
            mock.patch("dinov2_repro.distill.meta_arch.build_backbone_teacher", _planning_backbone_teacher(teacher_cfg)), \
            mock.patch("dinov2_repro.distill.meta_arch._load_centers", lambda *a, **k: None), \
            mock.patch("dinov2_repro.distill.meta_arch.copy", SimpleNamespace(deepcopy=_fake_safe_deepcopy)):
        yield


def _teacher_description(config_file: str | Path | None, overrides: Sequence[str],
                         teacher_config: str | Path | None) -> DictConfig:
    """The teacher as a training config: ``--teacher-config``, or (a backbone-only teacher,
    ``distill.method=features``) the registered ``distill.teacher_arch`` with its patch size."""
    if teacher_config:
        return load_config(teacher_config)
    from dinov2_repro.distill.config import merge_distill_config

    recipe = merge_distill_config(config_file, overrides)
    if recipe.distill.method == "features" and recipe.distill.teacher_arch:
        try:
            return load_config(None, [f"student.arch={recipe.distill.teacher_arch}",
                                      f"student.patch_size={int(recipe.distill.teacher_patch_size) or 14}",
                                      f"crops.global_crops_size={recipe.crops.global_crops_size}"])
        except ConfigError as err:
            raise ConfigError(f"planning: cannot describe the teacher from distill.teacher_arch: {err}") from None
    raise ConfigError("planning a distillation config needs --teacher-config (the teacher's training YAML, "
                      "e.g. configs/train/vitg14.yaml); a distill.method=features recipe may name distill.teacher_arch instead")


def load_planning_distill_config(config_file: str | Path | None, overrides: Sequence[str], *,
                                 teacher_config: str | Path) -> tuple[DictConfig, Callable, Callable]:
    """(config, build_meta_arch, shard_meta_arch) for ``trace_step`` of a distillation recipe."""
    from dinov2_repro.distill.config import load_distill_config
    from dinov2_repro.distill.meta_arch import DistillMetaArch
    from dinov2_repro.distill.run import wrap_distill_if_distributed

    teacher_cfg = _teacher_description(config_file, overrides, teacher_config)
    with _planning_teacher_patches(teacher_cfg):
        cfg = load_distill_config(config_file, overrides, teacher="(planned from config)")

    def build(config: DictConfig) -> nn.Module:
        with _planning_teacher_patches(teacher_cfg):
            return DistillMetaArch(config)

    def shard(model: nn.Module, config: DictConfig) -> nn.Module:
        return wrap_distill_if_distributed(model, config, env=None)

    return cfg, build, shard
