"""Consolidate a training checkpoint into one backbone file (``dinov2-repro export``)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from .export import save_backbone
from .train.checkpoint import load_model_state, read_meta, resolve_checkpoint
from .train.meta_arch import SSLMetaArch


def export_from_checkpoint(checkpoint: str | Path, out: str | Path, *, fmt: str = "timm", which: str = "teacher") -> Path:
    if fmt != "timm":
        raise ValueError(f"export format {fmt!r} unknown; only 'timm' is supported")
    checkpoint = resolve_checkpoint(checkpoint, what="--checkpoint")
    cfg = OmegaConf.create(read_meta(checkpoint)["config"])
    meta_arch = SSLMetaArch(cfg)
    load_model_state(checkpoint, meta_arch)
    backbone = getattr(meta_arch, which).backbone
    out = Path(out)
    save_backbone(backbone, out, arch=cfg.student.arch, mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std))
    return out
