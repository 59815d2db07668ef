"""Atomic, reshardable training checkpoints.

Layout: ``checkpoints/iter_XXXXXXXX/`` holds the model and optimiser state written with
torch.distributed.checkpoint (DCP; each rank writes its own shards, keyed by parameter name,
so a run can resume at another world size), ``meta.json`` (iteration, world size, resolved
config, loss-scaler state) and ``rng_rank<k>.pt`` per rank. ``checkpoints/last`` names the
newest complete one. A checkpoint is written under a temporary name and renamed only once
every rank has finished; the pointer is replaced after that, so a crash never leaves a half
checkpoint.

Nothing here unpickles arbitrary objects (docs/security.md): the metadata is JSON, and the RNG
files hold only tensors, numbers and strings, read with ``torch.load(weights_only=True)``. Older
versions wrote ``meta.pt`` as a pickle; it is refused with a message, never loaded. DCP's own
``.metadata`` index is a pickle that ``dcp.load`` reads, so a checkpoint directory stays
trusted input: share a safetensors export or teacher bundle instead.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

from ..distributed.env import barrier
from ..io.files import atomic_write_text

logger = logging.getLogger("dinov2_repro")
POINTER = "last"
META_FILE = "meta.json"
LEGACY_META_FILE = "meta.pt"  # pickled by versions before issue 19; refused, never unpickled
_RNG_KEYS = ("torch", "numpy_keys", "numpy_pos", "numpy_has_gauss", "numpy_cached_gaussian", "python_version",
             "python_state", "python_gauss_next")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy, Python (and CUDA) generator states as tensors, numbers and
    strings only, so that ``torch.load(weights_only=True)`` reads them back with no allow-list."""
    _, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_cached_gaussian": float(np_cached),
        "python_version": int(py_version), "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss_next": py_gauss,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), int(state["numpy_has_gauss"]),
                         float(state["numpy_cached_gaussian"])))
    random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_rng_state(file: str | os.PathLike) -> dict[str, Any]:
    """An RNG file written by :func:`save_checkpoint`, read with ``weights_only=True``: a file that
    needs anything but tensors and plain values is refused, not unpickled."""
    file = Path(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{file}: not an RNG state file of this version, refused without running it "
                         f"({' '.join(str(err).split())[:200]})") from None
    missing = [key for key in _RNG_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{file}: RNG state file lacks {missing}")
    return state


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quiet():
    # DCP warns on every call without a process group; a single process is a supported layout here.
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_checkpoint(run_dir: str | os.PathLike, iteration: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], rank: int = 0, keep_last: int = 3) -> Path:
    """Collective: every rank calls it. ``iteration`` is the number of finished iterations."""
    root = checkpoint_dir(run_dir)
    final = root / f"iter_{iteration:08d}"
    tmp = root / f".tmp_iter_{iteration:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        atomic_write_text(tmp / META_FILE, json.dumps({**meta, "iteration": iteration}, indent=1, allow_nan=True) + "\n")
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / POINTER, final.name + "\n")
        _prune(root, keep_last)
    barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    finished = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in finished[: max(len(finished) - keep_last, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    root = checkpoint_dir(run_dir)
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    target = root / pointer.read_text().strip()
    if not (target / META_FILE).is_file():
        _refuse_legacy(target)
        raise FileNotFoundError(f"checkpoint pointer {pointer} names {target}, which holds no {META_FILE}")
    return target


def _refuse_legacy(checkpoint: Path) -> None:
    """One clear line for a checkpoint of the old layout: its pickled ``meta.pt`` is not loaded."""
    legacy = checkpoint / LEGACY_META_FILE
    if legacy.is_file() and not (checkpoint / META_FILE).is_file():
        raise ValueError(f"{legacy}: checkpoint metadata in the pickle format of older dinov2_repro versions is not "
                         f"read (unpickling a file can run any code); this version reads {META_FILE} "
                         "(see docs/security.md)")


def resolve_checkpoint(path: str | os.PathLike, *, what: str = "checkpoint") -> Path:
    """A run directory (its last checkpoint) or a checkpoint directory itself; ``what`` names
    the setting in error messages."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = last_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{what}={path}: the run directory has no finished checkpoint")
        return found
    if not (path / META_FILE).is_file():
        _refuse_legacy(path)
        raise FileNotFoundError(f"{what}={path} is neither a run directory nor a checkpoint directory")
    return path


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``meta.json`` (iteration, world_size, config, scaler)."""
    checkpoint = Path(checkpoint)
    _refuse_legacy(checkpoint)
    file = checkpoint / META_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: cannot read checkpoint metadata: {' '.join(str(err).split())}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: checkpoint metadata is not a JSON object")
    return meta


def load_checkpoint(checkpoint: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    rank: int = 0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load model (and optimiser) state in place, at any world size. Returns (meta, this rank's
    RNG state or None when the checkpoint was written at another world size)."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    if optimizer is not None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
    else:
        state = {"model": get_model_state_dict(model)}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(checkpoint))
    except Exception as err:
        raise RuntimeError(f"cannot load checkpoint {checkpoint}: {err}") from err
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])
    rng_file = checkpoint / f"rng_rank{rank}.pt"
    same_world = meta.get("world_size") == (dist.get_world_size() if _distributed() else 1)
    rng = read_rng_state(rng_file) if same_world and rng_file.is_file() else None
    if rng is None:
        logger.warning("checkpoint %s was written at world size %s: RNG streams are reseeded, not restored",
                       checkpoint, meta.get("world_size"))
    return meta, rng


def load_model_state(checkpoint: str | os.PathLike, model: nn.Module) -> None:
    """Load only the model weights of a checkpoint into an unsharded ``model`` in one process
    (DCP reassembles the shards: no hand unsharding)."""
    load_checkpoint(checkpoint, model=model, optimizer=None)
