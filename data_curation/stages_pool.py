"""The tile and embed stages as units (units.py).

tile:  ``scenes`` (sharded: scene j goes to shard j mod N) -> ``manifest`` (one task: concatenates
       the per-scene manifests, adds folder images).
embed: ``embedder`` (one task: trains the sscd embedder when missing, checks or imports
       ``--from-embeddings``) -> ``embed`` (sharded: embedding shard j of every set goes to
       shard j mod N; rows per embedding shard = embed.shard_size, whatever N) -> ``index``
       (one task: writes each set's index.json).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from .fingerprint import record_stage
from .io import atomic_write_json, read_manifest, resolve_resource
from .paths import embedding_sets, out, pool_manifest, require, sscd_checkpoint
from .units import Phase, ShardContext, StageUnit, remove_other_work

log = logging.getLogger(__name__)


# ---- tile --------------------------------------------------------------------------------
def _tile_args(cfg: DictConfig) -> dict:
    if not cfg.tile.scenes and not cfg.pool.folders:
        raise ValueError("tile: set tile.scenes (GeoTIFFs), pool.folders or pool.manifest")
    return dict(scenes=[str(resolve_resource(s)) for s in cfg.tile.scenes],
                folders=[str(resolve_resource(f)) for f in cfg.pool.folders], size=cfg.tile.size,
                stride=cfg.tile.stride, bands=OmegaConf.to_container(cfg.tile.bands) if cfg.tile.bands else None,
                max_invalid_fraction=cfg.tile.max_invalid_fraction, nodata=cfg.tile.nodata, pool_dir=out(cfg, "pool"))


def tile_scenes(ctx: ShardContext) -> None:
    from .tiling import run_tile

    if ctx.cfg.pool.manifest:
        return
    args = _tile_args(ctx.cfg)
    run_tile(**args, only=ctx.mine(list(range(len(args["scenes"])))))


def tile_manifest(ctx: ShardContext) -> None:
    from .tiling import run_tile

    cfg = ctx.cfg
    if cfg.pool.manifest:
        log.info("tile: pool.manifest is set (%s); nothing to tile", cfg.pool.manifest)
        require(pool_manifest(cfg), "tile", "pool.manifest must point to a JSONL manifest")
    else:
        run_tile(**_tile_args(cfg))
    record_stage(cfg, "tile", [])
    remove_other_work(ctx)


# ---- embed -------------------------------------------------------------------------------
def train_sscd_if_missing(cfg: DictConfig) -> Path:
    import torch

    from dinov2_repro.device import resolve_device

    from .images import load_row_image, resize_tensor
    from .sscd import save_copy_detector, train_copy_detector

    path = sscd_checkpoint(cfg)
    if path.is_file():
        return path
    manifest = require(pool_manifest(cfg), "embed", "run the tile stage first")
    rows = read_manifest(manifest)
    rng = np.random.default_rng(cfg.seed)
    picks = np.sort(rng.choice(len(rows), min(len(rows), cfg.sscd.max_images), replace=False))
    # Keep a margin above the training size so random crops still hold detail.
    hold = int(cfg.sscd.img_size * 1.5)
    bands = list(cfg.embed.bands) if cfg.embed.bands else None
    images = torch.stack([resize_tensor(torch.from_numpy(load_row_image(rows[i], manifest.parent, bands)), hold) for i in picks])
    model, losses = train_copy_detector(
        images, steps=cfg.sscd.steps, batch_size=cfg.sscd.batch_size, img_size=cfg.sscd.img_size,
        embed_dim=cfg.sscd.embed_dim, width=cfg.sscd.width, lr=cfg.sscd.lr, weight_decay=cfg.sscd.weight_decay,
        temperature=cfg.sscd.temperature, koleo_weight=cfg.sscd.koleo_weight, seed=cfg.seed,
        dihedral_augment=not cfg.embed.dihedral_pool, device=str(resolve_device(cfg.device, key="device")))
    save_copy_detector(model.cpu(), path, {"trained_on": str(manifest), "images": len(images), "steps": cfg.sscd.steps,
                                           "final_loss": round(losses[-1], 4)})
    return path


def _imported(cfg: DictConfig) -> dict[str, Path]:
    """Sets whose embeddings come from ``embed.from_embeddings`` (the pool: DIR itself; another
    set: DIR/<set name>/ when it exists)."""
    if not cfg.embed.from_embeddings:
        return {}
    root = Path(str(cfg.embed.from_embeddings)).resolve()
    sets = {"pool": root}
    for name in embedding_sets(cfg):
        if name != "pool" and (root / name / "index.json").is_file():
            sets[name] = root / name
    return sets


def _jobs(cfg: DictConfig) -> dict[str, dict]:
    """Embedding job of every set the embed stage computes itself."""
    from .embed import file_digest

    imported = _imported(cfg)
    checkpoint = str(sscd_checkpoint(cfg)) if cfg.embed.embedder == "sscd" else None
    jobs = {}
    for name, manifest in embedding_sets(cfg).items():
        if name in imported:
            continue
        require(manifest, "embed", "run the tile stage first or fix the manifest path")
        jobs[name] = dict(manifest=str(manifest.resolve()), manifest_digest=file_digest(manifest),
                          out_dir=str(out(cfg, "embeddings", name)), embedder=cfg.embed.embedder, checkpoint=checkpoint,
                          img_size=cfg.embed.img_size, bands=list(cfg.embed.bands) if cfg.embed.bands else None,
                          dihedral_pool=cfg.embed.dihedral_pool, batch_size=cfg.embed.batch_size,
                          shard_size=cfg.embed.shard_size, seed=cfg.seed, device=cfg.device,
                          num_threads=cfg.num_threads, num_workers=cfg.embed.num_workers, progress=cfg.embed.progress)
    return jobs


def embed_prepare(ctx: ShardContext) -> None:
    from .embed import check_spec
    from .store import check_index

    cfg = ctx.cfg
    for name, folder in _imported(cfg).items():
        manifest = require(embedding_sets(cfg)[name], "embed", "run the tile stage first or fix the manifest path")
        index = check_index(folder, num_rows=len(read_manifest(manifest)))
        # The set's index.json points at the imported shards in place (no copy of a large set).
        shards = [dict(s, file=str((folder / s["file"]).resolve())) for s in index["shards"]]
        target = out(cfg, "embeddings", name)
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob("shard_*"):
            stale.unlink()
        atomic_write_json(target / "index.json", {**index, "shards": shards, "imported_from": str(folder),
                                                 "skipped": index.get("skipped", []),
                                                 "num_skipped": len(index.get("skipped", []))})
        log.info("embed: %s embeddings imported from %s (%d rows, dim %d)", name, folder, index["num_rows"], index["dim"])
    jobs = _jobs(cfg)
    if jobs and cfg.embed.embedder == "sscd":
        train_sscd_if_missing(cfg)
    for job in jobs.values():
        check_spec(job)


def embed_shard(ctx: ShardContext) -> None:
    from .embed import embed_shards

    procs = int(ctx.cfg.embed.num_procs)
    for name, job in _jobs(ctx.cfg).items():
        if ctx.num_shards == 1 and procs > 1:  # one task, several local processes (embed.num_procs)
            _spawn_ranks(job, procs)
            continue
        embed_shards(dict(job, num_threads=ctx.cfg.num_threads), rank=ctx.shard, world_size=ctx.num_shards,
                     on_shard=ctx.item_done, desc=f"embed {name}[{ctx.shard}/{ctx.num_shards}]")


def _spawn_ranks(job: dict, procs: int) -> None:
    import multiprocessing as mp

    from .embed import _worker

    context = mp.get_context("spawn")  # never fork: faiss/torch OpenMP state does not survive it
    workers = [context.Process(target=_worker, args=(job, rank, procs)) for rank in range(procs)]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join()
    failed = [rank for rank, proc in enumerate(workers) if proc.exitcode != 0]
    if failed:
        raise RuntimeError(f"embed: worker rank(s) {failed} failed; rerun to resume")


def embed_index(ctx: ShardContext) -> None:
    from .embed import write_index

    for job in _jobs(ctx.cfg).values():
        write_index(Path(job["out_dir"]), job)
    record_stage(ctx.cfg, "embed", ["tile"])
    remove_other_work(ctx)


TILE = StageUnit("tile", (Phase("scenes", tile_scenes, sharded=True), Phase("manifest", tile_manifest)))
EMBED = StageUnit("embed", (Phase("embedder", embed_prepare), Phase("embed", embed_shard, sharded=True),
                            Phase("index", embed_index)), inputs=lambda cfg: ["tile"])
