"""Weights made elsewhere: released DINOv2 / DINOv3 files (reference .pth, timm safetensors)
and the DINOv3 form of the project's backbone export. Conversion lives here, apart from the
model code; ``backbone_file.load_backbone`` routes files to it.

Names are imported lazily so that the CLI can register ``import-weights`` without loading torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "read_released": "released", "detect_family": "released", "convert_released": "released",
    "read_tensor_file": "source", "dataset_from_name": "source", "WeightsFileError": "source",
    "DATASET_NORMALISATION": "source",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
