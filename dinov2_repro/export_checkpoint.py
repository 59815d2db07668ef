"""Consolidate a training checkpoint into one backbone file (``dinov2-repro export``)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from .export import save_backbone
from .train.checkpoint import last_checkpoint, load_model_state, read_meta
from .train.meta_arch import SSLMetaArch


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its last checkpoint) or a checkpoint directory itself."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = last_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"run directory {path} has no finished checkpoint")
        return found
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def export_from_checkpoint(checkpoint: str | Path, out: str | Path, *, fmt: str = "timm", which: str = "teacher") -> Path:
    if fmt != "timm":
        raise ValueError(f"export format {fmt!r} unknown; only 'timm' is supported")
    checkpoint = resolve_checkpoint(checkpoint)
    cfg = OmegaConf.create(read_meta(checkpoint)["config"])
    meta_arch = SSLMetaArch(cfg)
    load_model_state(checkpoint, meta_arch)
    backbone = getattr(meta_arch, which).backbone
    out = Path(out)
    save_backbone(backbone, out, arch=cfg.student.arch, mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std))
    return out
