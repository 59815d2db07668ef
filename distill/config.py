"""Distillation config: the SSL defaults plus ``configs/distill/distill_defaults.yaml``, an
experiment YAML, ``key=value`` overrides, then the teacher checkpoint's own facts.

Everything here is cheap (YAML, the checkpoint's ``meta.json`` and DCP index, or a teacher
bundle's header): the CLI calls it before launching, so a wrong teacher path or a mismatched
architecture fails in a second, not after a Slurm queue wait.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from dinov2_repro.config import CONFIG_DIR, DEFAULTS_PATH, ConfigError, load_config
from dinov2_repro.models import build_vit
from dinov2_repro.teacher_bundle import bundle_config, bundle_weight_names, teacher_bundle_file
from dinov2_repro.train.checkpoint import read_meta, resolve_checkpoint
from dinov2_repro.train.validate import check_rope_keys

from .features import CLS_TARGETS, FEATURE_LOSSES

logger = logging.getLogger("dinov2_repro")
DISTILL_DEFAULTS_PATH = CONFIG_DIR / "distill" / "distill_defaults.yaml"
# Keys a student section may set besides those of the `student:` template.
_STUDENT_EXTRA_KEYS = ("name", "base_lr")
_HEAD_KEYS = ("head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim")
DISTILL_METHODS = ("auto", "heads", "features")
_PRETRAINING_ONLY_KEYS = ("train.freeze_backbone_iterations", "train.unfreeze_lr_ramp_iterations")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudentSpec:
    name: str            # export file: export/student_<name>_backbone.safetensors
    section: DictConfig  # a full `student:` section (arch, patch_size, ffn_layer, ...)
    base_lr: float


def merge_distill_config(config_file: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, experiment YAML and overrides merged and validated (keys, types, students);
    the teacher is not looked at."""
    cfg = load_config(config_file, overrides, defaults_file=(DEFAULTS_PATH, DISTILL_DEFAULTS_PATH))
    for key in _PRETRAINING_ONLY_KEYS:  # read by pretraining only: a value here would be silently ignored
        section, name = key.split(".")
        if cfg[section][name] not in (0, 0.0, ""):
            raise ConfigError(f"{key}={cfg[section][name]!r} is a continued-pretraining setting; distillation does not "
                              "use it (the teacher is frozen, the students start fresh): remove it")
    if cfg.distill.method not in DISTILL_METHODS:
        raise ConfigError(f"distill.method={cfg.distill.method!r} unknown; choose one of {', '.join(DISTILL_METHODS)}")
    if cfg.distill.feature_loss not in FEATURE_LOSSES:
        raise ConfigError(f"distill.feature_loss={cfg.distill.feature_loss!r} unknown; choose one of {', '.join(FEATURE_LOSSES)}")
    if cfg.distill.feature_cls_targets not in CLS_TARGETS:
        raise ConfigError(f"distill.feature_cls_targets={cfg.distill.feature_cls_targets!r} unknown; choose one of "
                          f"{', '.join(CLS_TARGETS)}")
    if cfg.distill.feature_patch_loss_weight < 0:
        raise ConfigError(f"distill.feature_patch_loss_weight={cfg.distill.feature_patch_loss_weight} must be >= 0")
    student_specs(cfg)
    from dinov2_repro.train.validate import check_trackers

    check_trackers(cfg)  # a configured tracker that is not installed fails here, before the teacher is read
    return cfg


def load_distill_config(config_file: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
                        teacher: str | os.PathLike | None = None) -> DictConfig:
    """Merge and validate the distillation config; resolve and check the teacher checkpoint.

    ``teacher`` (a run or checkpoint directory) overrides ``distill.teacher``. The result has
    ``distill.teacher`` set to the resolved checkpoint directory, the head sizes set to the
    teacher's, and ``distill.teacher_*`` filled in from the checkpoint."""
    cfg = merge_distill_config(config_file, overrides)
    if teacher:
        cfg.distill.teacher = str(teacher)
    return attach_teacher(cfg)


# ---- students ------------------------------------------------------------------------------
def student_specs(cfg: DictConfig) -> list[StudentSpec]:
    """One spec per entry of ``distill.students`` (a name, or a section over the `student:` template)."""
    entries = cfg.distill.students
    if isinstance(entries, str):
        entries = [entries]
    if not entries:
        raise ConfigError("distill.students is empty: name at least one student architecture, e.g. distill.students=[vit_small]")
    template = OmegaConf.to_container(cfg.student, resolve=True)
    specs: list[StudentSpec] = []
    for position, entry in enumerate(entries):
        where = f"distill.students[{position}]"
        entry = OmegaConf.to_container(entry, resolve=True) if OmegaConf.is_config(entry) else entry
        if isinstance(entry, str):
            entry = {"arch": entry}
        if not isinstance(entry, dict) or "arch" not in entry:
            raise ConfigError(f"{where}={entry!r}: give an architecture name or a section with an 'arch' key")
        unknown = sorted(set(entry) - set(template) - set(_STUDENT_EXTRA_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: the `student:` keys and {list(_STUDENT_EXTRA_KEYS)}")
        if float(entry.get("drop_path_rate", 0.0)) != 0.0:
            raise ConfigError(f"{where}.drop_path_rate={entry['drop_path_rate']}: distilled students use no "
                              "stochastic depth (recipe); remove the key or set it to 0")
        name = str(entry.pop("name", entry["arch"]))
        base_lr = float(entry.pop("base_lr", cfg.optim.base_lr))
        if base_lr <= 0:
            raise ConfigError(f"{where}.base_lr={base_lr} must be > 0")
        section = OmegaConf.create({**template, **entry, "drop_path_rate": 0.0})
        check_rope_keys(section, where)
        try:
            with torch.device("meta"):
                build_vit(section.arch)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        specs.append(StudentSpec(name=name, section=section, base_lr=base_lr))
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"distill.students: names {duplicates} occur twice; give the sections distinct 'name' keys")
    return specs


# ---- teacher -------------------------------------------------------------------------------
def resolve_teacher_checkpoint(path: str | os.PathLike) -> Path:
    """The teacher's DCP checkpoint directory (or teacher bundle file), or a ConfigError that says what to pass instead."""
    if not str(path):
        raise ConfigError("no teacher: pass --teacher RUN_DIR_OR_CHECKPOINT (or distill.teacher=...)")
    path = Path(path)
    bundle = teacher_bundle_file(path)  # a shareable `export --with-heads` file
    if bundle is not None:
        return bundle
    if path.is_file() or (path / "export").is_dir() and not (path / "checkpoints").is_dir():
        raise ConfigError(f"distill.teacher={path} is a backbone without the DINO/iBOT heads; distill.method=heads "
                          "needs the heads: pass the pretraining run directory or one of its checkpoints/iter_* "
                          "directories, a teacher bundle (`dinov2-repro export --with-heads`), or use distill.method=features "
                          "(head-free) with the backbone file")
    if not path.exists():
        raise ConfigError(f"distill.teacher={path} does not exist")
    try:
        return resolve_checkpoint(path, what="distill.teacher").resolve()
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None


def _checkpoint_keys(checkpoint: Path) -> set[str]:
    """The teacher's tensor names as the DCP checkpoint spells them (``model.teacher.dino_head...``);
    a bundle's ``dino_head.*`` etc. are mapped to the same names."""
    import torch.distributed.checkpoint as dcp

    if teacher_bundle_file(checkpoint) is not None:
        return {f"model.teacher.{name}" for name in bundle_weight_names(checkpoint)}
    return set(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)


def teacher_config(checkpoint: Path) -> DictConfig:
    """The resolved config the teacher was trained with (from the checkpoint's meta.json, or
    the sections a teacher bundle carries)."""
    if teacher_bundle_file(checkpoint) is not None:
        return bundle_config(checkpoint)
    meta = read_meta(checkpoint)
    if "config" not in meta:
        raise ConfigError(f"distill.teacher={checkpoint}: meta.json has no training config; not a pretraining checkpoint")
    return OmegaConf.create(meta["config"])


def _param_count(section: DictConfig) -> int:
    with torch.device("meta"):
        model = build_vit(section.arch, patch_size=section.patch_size, ffn_layer=section.ffn_layer)
    return sum(p.numel() for p in model.parameters())


def resolve_method(cfg: DictConfig) -> str:
    """``distill.method`` with ``auto`` resolved: heads for a run directory, a checkpoint or a
    teacher bundle (``export --with-heads``), which carry the teacher's heads; features for a
    backbone-only file (an export or a released checkpoint)."""
    method = str(cfg.distill.method)
    if method == "auto":
        path = Path(str(cfg.distill.teacher))
        if not path.is_file() or teacher_bundle_file(path) is not None:
            return "heads"
        return "features"
    return method


def read_teacher_header(path: Path) -> dict:
    """The header of a backbone-file teacher (weights are not read for this project's export)."""
    from dinov2_repro.train.initialize import read_backbone_header

    return read_backbone_header(path, key="distill.teacher")


def attach_backbone_teacher(cfg: DictConfig) -> DictConfig:
    """``distill.method=features``: check a backbone-file teacher against the config and copy its
    facts (arch, patch size, width, bands, normalisation) into ``cfg``."""
    path = Path(str(cfg.distill.teacher))
    if not path.is_file():
        raise ConfigError(f"distill.teacher={path}: distill.method=features needs a backbone file (a .safetensors "
                          "export or a released checkpoint); for a run directory use distill.method=heads, or pass "
                          "its export/teacher_backbone.safetensors")
    meta = read_teacher_header(path)
    facts = {"arch": str(meta["arch"]), "patch_size": int(meta["patch_size"]), "embed_dim": int(meta["embed_dim"]),
             "in_chans": int(meta["in_chans"])}
    for key, actual in facts.items():
        expected = cfg.distill.get(f"teacher_{key}")
        if expected not in ("", 0, None) and expected != actual:
            raise ConfigError(f"distill.teacher_{key}={expected!r} but the teacher file {path} has {key}={actual!r} "
                              "(from its header); fix the config or pick the right teacher")
        cfg.distill[f"teacher_{key}"] = actual
    cfg.distill.teacher = str(path.resolve())
    cfg.distill.method = "features"
    if cfg.student.in_chans != facts["in_chans"]:
        logger.info("student.in_chans=%s set to the teacher's %s", cfg.student.in_chans, facts["in_chans"])
        cfg.student.in_chans = facts["in_chans"]
    # The teacher's features are only meaningful on inputs normalised as it was trained (SAT-493M's
    # mean/std differ from ImageNet's): its header wins, and the students' exports record it.
    for key in ("mean", "std"):
        values = [float(v) for v in meta[key]]
        if [float(v) for v in cfg.crops[key]] != values:
            logger.info("crops.%s set to the teacher's %s", key, values)
        cfg.crops[key] = values
    for spec in student_specs(cfg):
        patch = int(spec.section.patch_size)
        for key in ("global_crops_size", "local_crops_size"):
            if cfg.crops[key] % patch and (key == "global_crops_size" or cfg.crops.local_crops_number):
                raise ConfigError(f"crops.{key}={cfg.crops[key]} must be a multiple of student {spec.name!r}'s "
                                  f"patch_size={patch} (the teacher's {facts['patch_size']} need not divide it)")
    return cfg


def attach_teacher(cfg: DictConfig) -> DictConfig:
    """Resolve ``distill.teacher``, check it against the config, copy its head sizes and
    band count into ``cfg``; warns when a student is larger than the teacher. A backbone-only
    teacher (``distill.method`` features, or auto with a file) goes to ``attach_backbone_teacher``."""
    if not str(cfg.distill.teacher):
        raise ConfigError("no teacher: pass --teacher RUN_DIR_OR_CHECKPOINT_OR_BACKBONE_FILE (or distill.teacher=...)")
    if resolve_method(cfg) == "features":
        return attach_backbone_teacher(cfg)
    cfg.distill.method = "heads"
    checkpoint = resolve_teacher_checkpoint(cfg.distill.teacher)
    keys = _checkpoint_keys(checkpoint)
    heads = [k for k in keys if k.startswith("model.teacher.dino_head.")]
    if not heads:
        raise ConfigError(f"distill.teacher={checkpoint}: the checkpoint holds no teacher DINO head "
                          "(model.teacher.dino_head.*); distillation needs a pretraining checkpoint with its heads")
    source = teacher_config(checkpoint)
    facts = {"arch": source.student.arch, "patch_size": int(source.student.patch_size),
             "in_chans": int(source.student.in_chans)}
    with torch.device("meta"):
        facts["embed_dim"] = build_vit(source.student.arch).embed_dim
    for key, actual in facts.items():
        expected = cfg.distill.get(f"teacher_{key}")
        if expected not in ("", 0, None) and expected != actual:
            raise ConfigError(f"distill.teacher_{key}={expected!r} but the teacher checkpoint {checkpoint} has "
                              f"{key}={actual!r} (from its training config); fix the config or pick the right teacher")
        cfg.distill[f"teacher_{key}"] = actual
    if source.ibot.separate_head and not any(k.startswith("model.teacher.ibot_head.") for k in keys):
        raise ConfigError(f"distill.teacher={checkpoint}: its config has ibot.separate_head=true but no iBOT head weights")
    cfg.distill.teacher = str(checkpoint)
    # Students get fresh heads shaped like the teacher's (prototype counts must match for the losses).
    for section in ("dino", "ibot"):
        for key in _HEAD_KEYS:
            cfg[section][key] = source[section][key]
    cfg.ibot.separate_head = bool(source.ibot.separate_head)
    if cfg.student.in_chans != facts["in_chans"]:
        logger.info("student.in_chans=%s set to the teacher's %s", cfg.student.in_chans, facts["in_chans"])
        cfg.student.in_chans = facts["in_chans"]
    if len(cfg.crops.mean) != facts["in_chans"] or len(cfg.crops.std) != facts["in_chans"]:
        raise ConfigError(f"crops.mean/crops.std have {len(cfg.crops.mean)}/{len(cfg.crops.std)} values but the teacher "
                          f"has in_chans={facts['in_chans']}: give one value per band (use the teacher's own)")
    if cfg.crops.global_crops_size % facts["patch_size"] or cfg.crops.local_crops_size % facts["patch_size"]:
        raise ConfigError(f"crops.global_crops_size={cfg.crops.global_crops_size} and crops.local_crops_size="
                          f"{cfg.crops.local_crops_size} must be multiples of the teacher's patch size {facts['patch_size']}")
    teacher_params = _param_count(source.student)
    for spec in student_specs(cfg):
        if spec.section.patch_size != facts["patch_size"] and not cfg.distill.resize_student_input:
            raise ConfigError(
                f"student {spec.name!r} has patch_size={spec.section.patch_size} but the teacher {facts['patch_size']}: "
                f"their token grids on {cfg.crops.global_crops_size} px crops differ, so the per-patch iBOT targets do "
                "not line up; use the teacher's patch size or set distill.resize_student_input=true")
        student_params = _param_count(spec.section)
        if student_params > teacher_params:
            message = (f"student {spec.name!r} ({student_params / 1e6:.1f}M parameters) is larger than the teacher "
                       f"{facts['arch']} ({teacher_params / 1e6:.1f}M); distillation usually goes the other way")
            warnings.warn(message, stacklevel=2)
            logger.warning(message)
    return cfg
