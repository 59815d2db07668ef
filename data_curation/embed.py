"""The ``embed`` stage: manifest rows -> sharded float16 ``.npy`` descriptors + ``index.json``.

Shard i holds rows [i * shard_size, (i + 1) * shard_size) of the manifest, so the index maps
every embedding row to its manifest row. Shards are written atomically and skipped when present:
a killed run recomputes only the missing ones, and gives the same bytes as an uninterrupted run
(batches never straddle shards). Several processes split the shards (rank r takes shards
r, r + world, ...); they are spawned, never forked, because faiss/torch OpenMP state does not survive fork.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from dinov2_repro.device import resolve_device

from .embedders import build_embedder, embed_batch
from .images import ManifestImages
from .io import atomic_save_npy, atomic_write_json, read_json, read_manifest

log = logging.getLogger(__name__)

# Test hook: seconds to sleep after each shard, so a test can kill the stage partway through.
SHARD_DELAY_ENV = "DATA_CURATION_TEST_SHARD_DELAY"


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def shard_ranges(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def shard_file(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard_{shard:05d}.npy"


def _job_spec(job: dict) -> dict:
    keys = ("manifest", "manifest_digest", "embedder", "checkpoint", "img_size", "bands", "dihedral_pool", "shard_size", "seed")
    return {k: job[k] for k in keys}


def embed_shards(job: dict, *, rank: int = 0, world_size: int = 1) -> list[int]:
    """Compute this rank's missing shards; returns the shard ids it computed."""
    torch.set_num_threads(max(1, int(job.get("num_threads", 2)) // world_size))
    out_dir = Path(job["out_dir"])
    rows = read_manifest(job["manifest"])
    device = resolve_device(job.get("device", "cpu"), key="device")
    spec = build_embedder(job["embedder"], img_size=job["img_size"], checkpoint=job.get("checkpoint"), seed=job["seed"])
    module = spec.module.to(device).eval()
    dataset = ManifestImages(rows=rows, manifest_dir=Path(job["manifest"]).parent, img_size=spec.img_size,
                             bands=job.get("bands"), channels=spec.in_chans)
    delay = float(os.environ.get(SHARD_DELAY_ENV, "0") or 0)
    todo = [(i, r) for i, r in enumerate(shard_ranges(len(rows), job["shard_size"]))
            if i % world_size == rank and not shard_file(out_dir, i).is_file()]
    progress = None
    if job.get("progress", True) and todo:
        from tqdm import tqdm

        progress = tqdm(total=sum(stop - start for _, (start, stop) in todo), desc=f"embed[{rank}]", unit="img")
    done = []
    workers = int(job.get("num_workers", 0))
    for shard, (start, stop) in todo:
        loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=job["batch_size"], shuffle=False,
                            num_workers=workers, multiprocessing_context="spawn" if workers else None)
        parts = []
        for _, images in loader:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                parts.append(embed_batch(module, images, dihedral_pool=job["dihedral_pool"]).cpu())
            if progress:
                progress.update(images.shape[0])
        atomic_save_npy(shard_file(out_dir, shard), torch.cat(parts).numpy().astype(np.float16))
        done.append(shard)
        if delay:
            time.sleep(delay)
    if progress:
        progress.close()
    return done


def _worker(job: dict, rank: int, world_size: int) -> None:
    embed_shards(job, rank=rank, world_size=world_size)


def run_embed(job: dict, *, num_procs: int = 1) -> Path:
    """Embed ``job['manifest']`` into ``job['out_dir']``; returns the index file.

    ``job`` keys: manifest, out_dir, embedder, checkpoint, img_size, bands, dihedral_pool,
    batch_size, shard_size, seed, device, num_threads, num_workers, progress.
    """
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    job = dict(job, manifest=str(Path(job["manifest"]).resolve()), manifest_digest=file_digest(job["manifest"]))
    spec_path = out_dir / "spec.json"
    spec = _job_spec(job)
    if spec_path.is_file():
        old = read_json(spec_path)
        if old != spec:
            changed = sorted(k for k in spec if old.get(k) != spec[k])
            raise ValueError(f"{out_dir}: existing shards were made with other settings ({', '.join(changed)}); "
                             f"delete the folder to re-embed")
    else:
        atomic_write_json(spec_path, spec)
    if num_procs > 1:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(job, rank, num_procs)) for rank in range(num_procs)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        failed = [rank for rank, proc in enumerate(procs) if proc.exitcode != 0]
        if failed:
            raise RuntimeError(f"embed: worker rank(s) {failed} failed; rerun to resume")
    else:
        embed_shards(job)
    return write_index(out_dir, job)


def write_index(out_dir: Path, job: dict) -> Path:
    num_rows = len(read_manifest(job["manifest"]))
    shards, dim = [], None
    for shard, (start, stop) in enumerate(shard_ranges(num_rows, job["shard_size"])):
        path = shard_file(out_dir, shard)
        if not path.is_file():
            raise RuntimeError(f"embed: shard {path} is missing; rerun embed to finish")
        array = np.load(path, mmap_mode="r")
        if array.shape[0] != stop - start:
            raise RuntimeError(f"embed: {path} holds {array.shape[0]} rows, expected {stop - start}")
        dim = array.shape[1]
        shards.append({"file": path.name, "start": start, "stop": stop})
    index = {"manifest": job["manifest"], "manifest_digest": job["manifest_digest"], "num_rows": num_rows,
             "dim": dim, "dtype": "float16", "shards": shards, "embedder": job["embedder"],
             "dihedral_pool": job["dihedral_pool"], "img_size": job["img_size"]}
    return atomic_write_json(out_dir / "index.json", index)


def load_embeddings(out_dir: str | Path) -> np.ndarray:
    """(num_rows, dim) float32, row i = manifest row i."""
    out_dir = Path(out_dir)
    index = read_json(out_dir / "index.json")
    parts = [np.load(out_dir / s["file"]) for s in index["shards"]]
    array = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, index["dim"] or 0), np.float32)
    if array.shape[0] != index["num_rows"]:
        raise ValueError(f"{out_dir}/index.json: {index['num_rows']} rows listed, shards hold {array.shape[0]}")
    return array


def embed_images(module: torch.nn.Module, images: Sequence[torch.Tensor] | torch.Tensor, *, dihedral_pool: bool,
                 batch_size: int = 64) -> np.ndarray:
    """In-memory helper (quality experiments): (N, C, S, S) -> (N, D) float32."""
    images = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
    out = [embed_batch(module, images[i : i + batch_size], dihedral_pool=dihedral_pool) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.float32)
