"""Devices and dtypes by name: the one ``resolve_device`` and the one dtype table of the project."""
from __future__ import annotations

from typing import Any

import torch

# Config spellings of compute dtypes (compute_precision.*) -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_from_name(name: str, *, key: str = "compute_precision.param_dtype") -> torch.dtype:
    """``bf16``/``fp16``/``fp32`` -> torch dtype; an unknown name is a ValueError naming ``key``."""
    if name not in DTYPES:
        raise ValueError(f"{key} {name!r} unknown; choose {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str, env: Any = None, *, key: str = "train.device") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` (this rank's GPU: ``env.local_rank``,
    else 0) or ``cuda:N``. Asking for CUDA without it is a RuntimeError naming ``key``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{key}={name} but CUDA is not available")
        return torch.device(name) if ":" in name else torch.device("cuda", getattr(env, "local_rank", 0))
    raise ValueError(f"{key} {name!r} unknown; choose auto, cpu, cuda or cuda:N")
