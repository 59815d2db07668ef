"""Atomic, reshardable training checkpoints.

Layout: ``checkpoints/iter_XXXXXXXX/`` holds the model and optimiser state written with
torch.distributed.checkpoint (DCP; each rank writes its own shards, keyed by parameter name,
so a run can resume at another world size), ``meta.pt`` (iteration, world size, resolved
config) and ``rng_rank<k>.pt`` per rank. ``checkpoints/last`` names the newest complete one.
A checkpoint is written under a temporary name and renamed only once every rank has
finished; the pointer is replaced after that, so a crash never leaves a half checkpoint.
"""
from __future__ import annotations

import contextlib
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
META_FILE = "meta.pt"


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        torch.save({**meta, "iteration": iteration}, tmp / META_FILE)
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
        raise FileNotFoundError(f"checkpoint pointer {pointer} names {target}, which holds no {META_FILE}")
    return target


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
        raise FileNotFoundError(f"{what}={path} is neither a run directory nor a checkpoint directory")
    return path


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    file = Path(checkpoint) / META_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise RuntimeError(f"cannot read checkpoint metadata {file}: {err}") from err


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
    rng = torch.load(rng_file, weights_only=False) if same_world and rng_file.is_file() else None
    if rng is None:
        logger.warning("checkpoint %s was written at world size %s: RNG streams are reseeded, not restored",
                       checkpoint, meta.get("world_size"))
    return meta, rng


def load_model_state(checkpoint: str | os.PathLike, model: nn.Module) -> None:
    """Load only the model weights of a checkpoint into an unsharded ``model`` in one process
    (DCP reassembles the shards: no hand unsharding)."""
    load_checkpoint(checkpoint, model=model, optimizer=None)
