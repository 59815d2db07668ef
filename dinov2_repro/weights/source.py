"""Reading a user-supplied weights file without running code, and what its name tells.

``.pth``/``.pt`` files load with ``torch.load(weights_only=True)`` (tensors and plain containers
only: a pickle that would run code is refused); ``.safetensors`` files load with safetensors.
Every failure becomes one ValueError line that names the file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

PTH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIXES = (".safetensors",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per training set of the released weights (released-weights.md): the satellite DINOv3 models
# were trained on SAT-493M with its own statistics; the web models use ImageNet's.
DATASET_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "lvd142m": (IMAGENET_MEAN, IMAGENET_STD),
    "lvd1689m": (IMAGENET_MEAN, IMAGENET_STD),
    "sat493m": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)),
}
# Containers some checkpoints wrap the backbone in (teacher checkpoints, EMA dicts).
_WRAPPER_KEYS = ("model", "state_dict", "teacher", "model_ema")
_PREFIXES = ("module.", "_orig_mod.", "backbone.")


class WeightsFileError(ValueError):
    """A weights file that cannot be read or understood; the message starts with its path."""


def _plain_tensors(obj: Any, path: Path) -> dict[str, Tensor]:
    # Unwrap {"model": {...}} style containers, then keep a flat str -> Tensor mapping.
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsFileError(f"{path}: holds {type(obj).__name__}, not a state dict of tensors")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue  # e.g. an iteration counter next to the weights
        key = str(key)
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    if not out:
        raise WeightsFileError(f"{path}: no tensors in the state dict (keys {list(obj)[:5]})")
    return out


def read_tensor_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str] | None]:
    """(tensors, safetensors metadata or None) of a ``.pth``/``.pt``/``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()
        except Exception as error:  # safetensors has its own error types for bad headers / short data
            raise WeightsFileError(f"{path}: cannot read the safetensors file (corrupt or truncated?): "
                                   f"{_first_line(error)}") from None
    if suffix not in PTH_SUFFIXES:
        raise WeightsFileError(f"{path}: unknown weights file type {suffix!r}; expected .pth, .pt or .safetensors")
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as error:  # truncated zip, not a checkpoint, or a pickle weights_only refuses
        # torch's message advises weights_only=False; this project never does that for user files.
        detail = _first_line(error).split(". ")[0]
        raise WeightsFileError(f"{path}: cannot read it as a weights-only torch checkpoint (truncated, corrupt, "
                               f"not a torch file, or it holds objects other than tensors; code in it is never "
                               f"run): {type(error).__name__}: {detail}") from None
    return _plain_tensors(obj, path), None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def dataset_from_name(path: str | os.PathLike) -> str | None:
    """The training set a released file's name gives (``..._pretrain_sat493m-<hash>.pth``), if any."""
    name = Path(path).name.lower()
    for dataset in DATASET_NORMALISATION:
        if re.search(rf"(^|[^a-z0-9]){dataset}([^a-z0-9]|$)", name):
            return dataset
    return None


def normalisation_for(dataset: str) -> tuple[list[float], list[float]]:
    if dataset not in DATASET_NORMALISATION:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASET_NORMALISATION)}")
    mean, std = DATASET_NORMALISATION[dataset]
    return list(mean), list(std)


def decode_header(raw: Mapping[str, str] | None) -> dict[str, Any]:
    """A safetensors header with JSON values (the project's exports); {} for other headers."""
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        try:
            out[key] = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            out[key] = value
    return out


def block_count(state: Mapping[str, Tensor], path: Path) -> int:
    indices = {int(m.group(1)) for key in state for m in [re.match(r"blocks\.(\d+)\.", key)] if m}
    if not indices:
        raise WeightsFileError(f"{path}: no transformer blocks (blocks.<i>.*) in the file")
    if indices != set(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise WeightsFileError(f"{path}: blocks {missing[:5]} are missing (truncated or chunked state dict?)")
    return len(indices)


def default_num_heads(embed_dim: int) -> int:
    """Heads of a released model from its width: head dim 64, except ViT-7B (4096 wide, 32 heads).
    The file has no head count; pass num_heads= for other shapes."""
    if embed_dim == 4096:
        return 32
    if embed_dim % 64:
        raise ValueError(f"cannot infer num_heads for embed_dim {embed_dim} (not a multiple of 64): pass num_heads")
    return embed_dim // 64


def require(state: Mapping[str, Tensor], keys, path: Path, what: str) -> None:
    missing = [key for key in keys if key not in state]
    if missing:
        raise WeightsFileError(f"{path}: not a {what} file: missing {missing[:5]}")
