"""ONNX export of backbones and segmentation models, checked against onnxruntime.

The exporter is torch.onnx's (the torch.export based path), which needs ``onnx`` and
``onnxscript``; the check after every export runs the file in ``onnxruntime``. All three come
with the ``onnx`` extra: ``pip install 'dinov2-repro[onnx]'``.
"""
from __future__ import annotations

import importlib.util

from ..config import ConfigError

REQUIRED_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install 'dinov2-repro[onnx]' (or: pip install onnx onnxscript onnxruntime)"


def require_onnx(option: str = "--format onnx") -> None:
    """Raise ConfigError (one line, exit 2) naming what is missing when an ONNX export is asked
    for but its packages are not installed."""
    missing = [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{option} needs {', '.join(missing)}, not installed: {INSTALL_HINT}")
