"""dinov2_repro: the DINOv2 self-supervised recipe for remote sensing.

The Python API (documented in docs/api.md; the ``dinov2-repro`` verbs call the same functions):

- ``train(config, overrides, launcher=...)``: SSL pretraining;
- ``distill(config, overrides, teacher=..., launcher=...)``: distillation into smaller students;
- ``curate(stage, config, overrides, ...)``: data curation stages;
- ``load_backbone(path)``: a backbone file as a model with ``embed(images)`` and ``patch_features(images)``;
- ``eval_seg(data, backbone, ...)`` and ``predict_seg(checkpoint, scene, out, ...)``: segmentation;
- ``plan(config, nodes=..., gpus_per_node=..., gpu=...)``: FLOPs, memory and GPU-hours without a GPU.

Importing the package is light: these names load their modules (and torch) on first use.
``train``, ``distill`` and ``plan`` are also subpackages; calling them calls the API function.
"""
from __future__ import annotations

import importlib
from typing import Any

_API = ("curate", "load_backbone", "eval_seg", "predict_seg")
_CALLABLE_PACKAGES = ("train", "distill", "plan")  # subpackages that forward calls to dinov2_repro.api
__all__ = sorted(_API + _CALLABLE_PACKAGES)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    if name in _CALLABLE_PACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
