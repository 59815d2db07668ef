"""Teacher bundle: a pretraining run's teacher as one shareable safetensors file.

``dinov2-repro export --checkpoint RUN --with-heads --out teacher.safetensors`` writes it;
``dinov2-repro distill --teacher teacher.safetensors`` takes it in place of the run directory and
builds the same frozen teacher (tests/test_security.py checks the outputs match).

Unlike a DCP checkpoint directory (whose ``.metadata`` index is a pickle), nothing in a bundle can
run code when read: safetensors holds raw tensors and a JSON header. Contents:
- ``backbone.*``: the backbone in the export layout (timm's DINOv2 keys, as ``backbone_file``);
- ``dino_head.*`` and, with ``ibot.separate_head``, ``ibot_head.*``: the DINO/iBOT heads;
- ``dino_center`` / ``ibot_center``: the softmax-centering centres (runs that used them);
- header (each value JSON): ``format``, ``format_version``, ``backbone`` (the backbone export
  header: enough to rebuild it without a config), ``config`` (the ``student``, ``crops``, ``dino``,
  ``ibot`` sections and ``train.centering`` of the run: the parts distillation reads; paths such
  as the dataset and output directory are left out), ``which`` (teacher or student) and
  ``iteration``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from .io.files import atomic_output

FORMAT_NAME = "dinov2_repro.teacher_bundle"
FORMAT_VERSION = 1
CONFIG_SECTIONS = ("student", "crops", "dino", "ibot")
HEADS = ("dino_head", "ibot_head")
CENTERS = ("dino", "ibot")


def write_teacher_bundle(meta_arch: nn.Module, cfg: DictConfig, path: str | os.PathLike, *, which: str = "teacher",
                         iteration: int | None = None) -> Path:
    """Write ``meta_arch.<which>`` (backbone + heads) and its centres to ``path``, atomically."""
    from safetensors.torch import save_file

    from .backbone_file import backbone_metadata, to_timm_state_dict

    modules = getattr(meta_arch, which)
    backbone = modules["backbone"]
    tensors: dict[str, Tensor] = {f"backbone.{k}": v for k, v in to_timm_state_dict(backbone).items()}
    for head in HEADS:
        if head in modules:
            tensors.update({f"{head}.{k}": v for k, v in modules[head].state_dict().items()})
    for name in CENTERS:
        center = getattr(meta_arch, f"{name}_center", None)
        if center is not None:
            tensors[f"{name}_center"] = center.center
    sections = {section: OmegaConf.to_container(cfg[section], resolve=True) for section in CONFIG_SECTIONS}
    sections["train"] = {"centering": str(cfg.train.centering)}
    header = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "backbone": backbone_metadata(backbone, arch=cfg.student.arch, mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std)),
        "config": sections, "which": which, "iteration": iteration,
    }
    # safetensors refuses shared or strided storage: contiguous CPU copies.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    path = Path(path)
    with atomic_output(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={key: json.dumps(value) for key, value in header.items()})
    return path


def _read_header(path: Path) -> dict[str, Any] | None:
    """The decoded header of a safetensors file, or a ValueError naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own types for a corrupt header
        raise ValueError(f"{path}: cannot read the safetensors file (corrupt, truncated or not safetensors?): "
                         f"{' '.join(str(error).split())[:200]}") from None
    header = {}
    for key, value in raw.items():
        try:
            header[key] = json.loads(value)
        except json.JSONDecodeError:
            header[key] = value
    return header


def teacher_bundle_file(path: str | os.PathLike) -> Path | None:
    """``path`` resolved when it is a teacher bundle; None for anything else (a directory, a
    backbone export, an unreadable file: the caller's own message for those applies)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    try:
        header = _read_header(path)
    except ValueError:
        return None
    if header.get("format") != FORMAT_NAME:
        return None
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: teacher bundle format_version {header['format_version']} is newer than this "
                         f"version reads ({FORMAT_VERSION})")
    return path.resolve()


def read_teacher_bundle(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, decoded header) of a teacher bundle; errors name the file."""
    from safetensors import safe_open

    path = Path(path)
    if teacher_bundle_file(path) is None:
        raise ValueError(f"{path}: not a dinov2_repro teacher bundle (write one with `dinov2-repro export --with-heads`)")
    header = _read_header(path)
    missing = [key for key in ("backbone", "config") if key not in header]
    if missing:
        raise ValueError(f"{path}: teacher bundle header lacks {missing}")
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, header


def bundle_config(path: str | os.PathLike) -> DictConfig:
    """The training-config sections a bundle carries (what distillation reads of the teacher run)."""
    return OmegaConf.create(read_teacher_bundle(path)[1]["config"])


def bundle_weight_names(path: str | os.PathLike) -> set[str]:
    """Names of the tensors in a bundle (``backbone.*``, ``dino_head.*``, ...)."""
    from safetensors import safe_open

    read_teacher_bundle(path)  # checks it is a bundle
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return set(handle.keys())


def _part(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix) + 1:]: value for key, value in tensors.items() if key.startswith(prefix + ".")}


def build_bundle_teacher(path: str | os.PathLike, *, attention_backend: str = "auto") -> tuple[nn.ModuleDict, DictConfig]:
    """(frozen {backbone, dino_head[, ibot_head]}, config sections) from a bundle, built as
    ``distill.meta_arch.build_teacher`` builds it from a run directory."""
    from .backbone_file import from_timm_state_dict
    from .train.meta_arch import _head, build_backbone

    path = Path(path)
    tensors, header = read_teacher_bundle(path)
    source = OmegaConf.create(header["config"])
    backbone = build_backbone(source.student, img_size=source.crops.global_crops_size, drop_path_rate=0.0,
                              attn_backend=attention_backend)
    teacher = nn.ModuleDict({"backbone": backbone, "dino_head": _head(source.dino, backbone.embed_dim)})
    if source.ibot.separate_head:
        teacher["ibot_head"] = _head(source.ibot, backbone.embed_dim)
    try:
        backbone.load_state_dict(from_timm_state_dict(_part(tensors, "backbone"), ffn=str(source.student.ffn_layer)), strict=True)
        for head in HEADS:
            if head in teacher:
                teacher[head].load_state_dict(_part(tensors, head), strict=True)
    except (RuntimeError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: teacher bundle weights do not match its own header: "
                         f"{' '.join(str(error).split())[:300]}") from None
    teacher.requires_grad_(False)
    return teacher.eval(), source


def bundle_centers(path: str | os.PathLike) -> dict[str, Tensor]:
    """{'dino': centre, 'ibot': centre} for the centres a bundle holds (softmax-centering runs)."""
    tensors, _ = read_teacher_bundle(path)
    return {name: tensors[f"{name}_center"] for name in CENTERS if f"{name}_center" in tensors}
