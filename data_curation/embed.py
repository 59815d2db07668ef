"""The ``embed`` stage: manifest rows -> sharded float16 ``.npy`` descriptors + ``index.json``.

Shard i holds rows [i * shard_size, (i + 1) * shard_size) of the manifest, so the index maps
every embedding row to its manifest row. Shards are written atomically and skipped when present:
a killed run recomputes only the missing ones, and gives the same bytes as an uninterrupted run
(batches never straddle shards). Several processes split the shards (rank r takes shards
r, r + world, ...); they are spawned, never forked, because faiss/torch OpenMP state does not survive fork.

Unreadable images (corrupt, truncated, GDAL read errors) are skipped, not fatal: each is logged
with its path, gets an all-zero descriptor (its row keeps its place, so row i is still manifest
row i; a zero vector is nobody's duplicate), and is listed in ``shard_*.skipped.json`` and then in
``index.json`` under ``skipped``. Dedup drops those rows. Every image unreadable is an error.
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
from torch.utils.data import DataLoader, Dataset, Subset

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


def skipped_file(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard_{shard:05d}.skipped.json"


class SkippingImages(Dataset):
    """``ManifestImages`` that turns an unreadable row into (index, zeros, "path: error") instead of raising."""

    def __init__(self, images: ManifestImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        try:
            row_index, image = self.images[index]
            return row_index, image, ""
        except Exception as error:  # any decode/IO failure of one file must not stop the stage
            path = self.images.rows[index].get("path")
            log.warning("embed: skipping unreadable image %s (row %d): %s: %s", path, index, type(error).__name__, error)
            blank = torch.zeros(self.images.channels, self.images.img_size, self.images.img_size)
            return index, blank, f"{type(error).__name__}: {error}"


def write_shard(out_dir: Path, shard: int, parts: list[torch.Tensor], skipped: list[dict]) -> None:
    """Write one finished shard: its skip list, then its float16 ``.npy`` (atomic, in that order)."""
    # The skip list first: a shard whose .npy exists is done, so its list must already be there.
    if skipped:
        atomic_write_json(skipped_file(out_dir, shard), skipped)
    else:
        skipped_file(out_dir, shard).unlink(missing_ok=True)
    atomic_save_npy(shard_file(out_dir, shard), torch.cat(parts).numpy().astype(np.float16))


def unreadable_rows(out_dir: str | Path) -> list[int]:
    """Manifest rows the embed stage in ``out_dir`` could not read (from its index.json)."""
    return [int(item["row"]) for item in read_json(Path(out_dir) / "index.json").get("skipped", [])]



def _job_spec(job: dict) -> dict:
    keys = ("manifest", "manifest_digest", "embedder", "checkpoint", "img_size", "bands", "dihedral_pool", "shard_size", "seed")
    # ``spec_extra``: settings of another writer of this format (the ``embed`` verb: features,
    # backbone file, pixel scaling) that must also match before its shards are reused.
    return {**{k: job[k] for k in keys}, **(job.get("spec_extra") or {})}


def embed_shards(job: dict, *, rank: int = 0, world_size: int = 1, on_shard=None, desc: str | None = None) -> list[int]:
    """Compute this rank's missing shards (shards rank, rank + world_size, ...); returns the shard
    ids it computed. ``on_shard()`` is called after each shard is written."""
    torch.set_num_threads(max(1, int(job.get("num_threads", 2))))
    out_dir = Path(job["out_dir"])
    rows = read_manifest(job["manifest"])
    device = resolve_device(job.get("device", "cpu"), key="device")
    spec = build_embedder(job["embedder"], img_size=job["img_size"], checkpoint=job.get("checkpoint"), seed=job["seed"])
    module = spec.module.to(device).eval()
    dataset = SkippingImages(ManifestImages(rows=rows, manifest_dir=Path(job["manifest"]).parent,
                                            img_size=spec.img_size, bands=job.get("bands"), channels=spec.in_chans))
    delay = float(os.environ.get(SHARD_DELAY_ENV, "0") or 0)
    todo = [(i, r) for i, r in enumerate(shard_ranges(len(rows), job["shard_size"]))
            if i % world_size == rank and not shard_file(out_dir, i).is_file()]
    from .progress import Progress

    progress = Progress(sum(stop - start for _, (start, stop) in todo), desc or f"embed[{rank}]", unit="img",
                        enabled=bool(job.get("progress", True)))
    done = []
    workers = int(job.get("num_workers", 0))
    for shard, (start, stop) in todo:
        loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=job["batch_size"], shuffle=False,
                            num_workers=workers, multiprocessing_context="spawn" if workers else None)
        parts, skipped = [], []
        for indexes, images, errors in loader:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                embedded = embed_batch(module, images, dihedral_pool=job["dihedral_pool"]).cpu()
            bad = [i for i, error in enumerate(errors) if error]
            if bad:
                embedded[bad] = 0.0
                skipped.extend({"row": int(indexes[i]), "path": rows[int(indexes[i])].get("path"), "error": errors[i]}
                               for i in bad)
            parts.append(embedded)
            progress.update(images.shape[0])
        write_shard(out_dir, shard, parts, skipped)
        done.append(shard)
        if on_shard is not None:
            on_shard()
        if delay:
            time.sleep(delay)
    progress.close()
    return done


def _worker(job: dict, rank: int, world_size: int) -> None:
    job = dict(job, num_threads=max(1, int(job.get("num_threads", 2)) // world_size))
    embed_shards(job, rank=rank, world_size=world_size)


def run_embed(job: dict, *, num_procs: int = 1) -> Path:
    """Embed ``job['manifest']`` into ``job['out_dir']``; returns the index file.

    ``job`` keys: manifest, out_dir, embedder, checkpoint, img_size, bands, dihedral_pool,
    batch_size, shard_size, seed, device, num_threads, num_workers, progress.
    """
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    job = dict(job, manifest=str(Path(job["manifest"]).resolve()), manifest_digest=file_digest(job["manifest"]))
    check_spec(job)
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


def check_spec(job: dict) -> None:
    """Refuse to mix shards of other settings into ``job['out_dir']`` (records the spec on first use)."""
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
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


def write_index(out_dir: Path, job: dict, *, extra: dict | None = None) -> Path:
    """Check that every shard of ``job`` is present and write ``out_dir/index.json`` (the shard
    format of store.py); ``extra`` adds keys (another writer's description of its rows)."""
    num_rows = len(read_manifest(job["manifest"]))
    shards, dim, skipped = [], None, []
    for shard, (start, stop) in enumerate(shard_ranges(num_rows, job["shard_size"])):
        path = shard_file(out_dir, shard)
        if not path.is_file():
            raise RuntimeError(f"embed: shard {path} is missing; rerun embed to finish")
        if skipped_file(out_dir, shard).is_file():
            skipped.extend(read_json(skipped_file(out_dir, shard)))
        array = np.load(path, mmap_mode="r")
        if array.shape[0] != stop - start:
            raise RuntimeError(f"embed: {path} holds {array.shape[0]} rows, expected {stop - start}")
        dim = array.shape[1]
        shards.append({"file": path.name, "start": start, "stop": stop})
    if num_rows and len(skipped) == num_rows:
        first = skipped[0]
        raise ValueError(f"embed: all {num_rows} images of {job['manifest']} are unreadable "
                         f"(first: {first['path']}: {first['error']}); check the files")
    if skipped:
        log.warning("embed: skipped %d unreadable image(s) of %d (listed in %s under 'skipped')", len(skipped),
                    num_rows, out_dir / "index.json")
    index = {"manifest": job["manifest"], "manifest_digest": job["manifest_digest"], "num_rows": num_rows,
             "dim": dim, "dtype": "float16", "shards": shards, "embedder": job["embedder"],
             "dihedral_pool": job["dihedral_pool"], "img_size": job["img_size"],
             "num_skipped": len(skipped), "skipped": skipped, **(extra or {})}
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
