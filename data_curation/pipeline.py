"""The curation stages wired to a config and one output directory.

Layout under ``output_dir``::

    pool/manifest.jsonl          tile (or pool.manifest)       the uncurated pool
    embedder/sscd.safetensors    embed (trained when missing)  the default dedup embedder
    embeddings/<set>/            embed                         shard_XXXXX.npy (float16) + index.json
    dedup/                       dedup                         knn shards, result.npz, selected.json
    retrieve/selected.json       retrieve
    cluster/hierarchy.npz        cluster
    sample/selected.json         sample
    export/manifest.jsonl        export                        + report.json and PNG plots

Every stage reads the previous stage's ``selected.json`` (rows of the pool manifest kept so
far, with the reason each was kept) and writes its own atomically.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf, DictConfig

from dinov2_repro.io.files import atomic_output

from .fingerprint import record_stage, require_fresh
from .io import atomic_save_npz, atomic_write_json, read_json, read_manifest, resolve_resource

log = logging.getLogger(__name__)


# ---- paths -------------------------------------------------------------------------------
def out(cfg: DictConfig, *parts: str) -> Path:
    return Path(cfg.output_dir).joinpath(*parts)


def pool_manifest(cfg: DictConfig) -> Path:
    return resolve_resource(cfg.pool.manifest) if cfg.pool.manifest else out(cfg, "pool", "manifest.jsonl")


def embedding_sets(cfg: DictConfig) -> dict[str, Path]:
    """Name -> manifest of every set the embed stage embeds: the pool, references, queries."""
    sets = {"pool": pool_manifest(cfg)}
    for i, path in enumerate(cfg.dedup.reference_manifests):
        sets[f"reference_{i}"] = resolve_resource(path)
    for i, path in enumerate(cfg.retrieve.query_manifests):
        sets[f"query_{i}"] = resolve_resource(path)
    return sets


def sscd_checkpoint(cfg: DictConfig) -> Path:
    return Path(cfg.embed.checkpoint) if cfg.embed.checkpoint else out(cfg, "embedder", "sscd.safetensors")


def setup_threads(cfg: DictConfig) -> None:
    import faiss
    import torch

    torch.set_num_threads(int(cfg.num_threads))
    faiss.omp_set_num_threads(int(cfg.num_threads))


def _require(path: Path, stage: str, hint: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{stage}: {path} does not exist; {hint}")
    return path


# ---- stages ------------------------------------------------------------------------------
def stage_tile(cfg: DictConfig) -> Path:
    from .tiling import run_tile

    if cfg.pool.manifest:
        log.info("tile: pool.manifest is set (%s); nothing to tile", cfg.pool.manifest)
        return _require(pool_manifest(cfg), "tile", "pool.manifest must point to a JSONL manifest")
    if not cfg.tile.scenes and not cfg.pool.folders:
        raise ValueError("tile: set tile.scenes (GeoTIFFs), pool.folders or pool.manifest")
    return run_tile(scenes=[str(resolve_resource(s)) for s in cfg.tile.scenes],
                    folders=[str(resolve_resource(f)) for f in cfg.pool.folders], size=cfg.tile.size,
                    stride=cfg.tile.stride, bands=OmegaConf.to_container(cfg.tile.bands) if cfg.tile.bands else None,
                    max_invalid_fraction=cfg.tile.max_invalid_fraction, nodata=cfg.tile.nodata,
                    pool_dir=out(cfg, "pool"))


def train_sscd_if_missing(cfg: DictConfig) -> Path:
    import torch

    from .images import load_row_image, resize_tensor
    from .sscd import save_copy_detector, train_copy_detector

    path = sscd_checkpoint(cfg)
    if path.is_file():
        return path
    manifest = _require(pool_manifest(cfg), "embed", "run the tile stage first")
    rows = read_manifest(manifest)
    rng = np.random.default_rng(cfg.seed)
    picks = np.sort(rng.choice(len(rows), min(len(rows), cfg.sscd.max_images), replace=False))
    # Keep a margin above the training size so random crops still hold detail.
    hold = int(cfg.sscd.img_size * 1.5)
    bands = list(cfg.embed.bands) if cfg.embed.bands else None
    images = torch.stack([resize_tensor(torch.from_numpy(load_row_image(rows[i], manifest.parent, bands)), hold) for i in picks])
    from dinov2_repro.device import resolve_device

    model, losses = train_copy_detector(
        images, steps=cfg.sscd.steps, batch_size=cfg.sscd.batch_size, img_size=cfg.sscd.img_size,
        embed_dim=cfg.sscd.embed_dim, width=cfg.sscd.width, lr=cfg.sscd.lr, weight_decay=cfg.sscd.weight_decay,
        temperature=cfg.sscd.temperature, koleo_weight=cfg.sscd.koleo_weight, seed=cfg.seed,
        dihedral_augment=not cfg.embed.dihedral_pool, device=str(resolve_device(cfg.device, key="device")))
    save_copy_detector(model.cpu(), path, {"trained_on": str(manifest), "images": len(images), "steps": cfg.sscd.steps,
                                           "final_loss": round(losses[-1], 4)})
    return path


def stage_embed(cfg: DictConfig) -> dict[str, Path]:
    from .embed import run_embed

    checkpoint = str(train_sscd_if_missing(cfg)) if cfg.embed.embedder == "sscd" else None
    indexes = {}
    for name, manifest in embedding_sets(cfg).items():
        _require(manifest, "embed", "run the tile stage first or fix the manifest path")
        job = dict(manifest=str(manifest), out_dir=str(out(cfg, "embeddings", name)), embedder=cfg.embed.embedder,
                   checkpoint=checkpoint, img_size=cfg.embed.img_size,
                   bands=list(cfg.embed.bands) if cfg.embed.bands else None, dihedral_pool=cfg.embed.dihedral_pool,
                   batch_size=cfg.embed.batch_size, shard_size=cfg.embed.shard_size, seed=cfg.seed, device=cfg.device,
                   num_threads=cfg.num_threads, num_workers=cfg.embed.num_workers, progress=cfg.embed.progress)
        indexes[name] = run_embed(job, num_procs=cfg.embed.num_procs)
    return indexes


def _embeddings(cfg: DictConfig, name: str) -> np.ndarray:
    from .embed import load_embeddings
    from .knn import normalize

    folder = _require(out(cfg, "embeddings", name, "index.json"), "embeddings", "run the embed stage first").parent
    return normalize(load_embeddings(folder))


def pool_knn(cfg: DictConfig, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Self-kNN of the pool, resumable by query shard; the trained index is saved too."""
    import faiss

    from .knn import build_index, has_faiss_gpu, rescore, search, set_nprobe

    knn_dir = out(cfg, "dedup", "knn")
    knn_dir.mkdir(parents=True, exist_ok=True)
    n, k = len(x), min(cfg.dedup.k + 1, len(x))  # +1: the query itself comes back
    shards = [(s, min(s + cfg.dedup.shard_size, n)) for s in range(0, n, cfg.dedup.shard_size)]
    files = [knn_dir / f"shard_{i:05d}.npz" for i in range(len(shards))]
    # Shards of other embeddings or settings must not be reused.
    import hashlib

    spec = {"embeddings_sha": hashlib.sha256(x.tobytes()).hexdigest()[:16], "k": k, "index": cfg.dedup.index,
            "nprobe": cfg.dedup.nprobe, "shard_size": cfg.dedup.shard_size, "seed": cfg.seed}
    spec_file = knn_dir / "spec.json"
    if spec_file.is_file() and read_json(spec_file) != spec:
        for stale in list(knn_dir.glob("shard_*.npz")) + [knn_dir / "index.faiss"]:
            stale.unlink(missing_ok=True)
        log.info("dedup: embeddings or kNN settings changed; old kNN shards removed")
    atomic_write_json(spec_file, spec)
    index = None
    index_file = knn_dir / "index.faiss"
    for path, (start, stop) in zip(files, shards):
        if path.is_file():
            continue
        if index is None:
            if index_file.is_file():
                index = faiss.read_index(str(index_file))
                set_nprobe(index, cfg.dedup.nprobe)
            else:
                index = build_index(x, factory=cfg.dedup.index, nprobe=cfg.dedup.nprobe, seed=cfg.seed)
                # GPU indexes are saved through their CPU copy (faiss cannot serialise them directly).
                with atomic_output(index_file) as tmp:
                    faiss.write_index(faiss.index_gpu_to_cpu(index) if has_faiss_gpu() else index, str(tmp))
        _, ids = search(index, x[start:stop], k, batch=cfg.dedup.query_batch)
        scores = rescore(x[start:stop], x, ids)
        atomic_save_npz(path, scores=scores, ids=ids)
    parts = [np.load(p) for p in files]
    return np.concatenate([p["scores"] for p in parts]), np.concatenate([p["ids"] for p in parts])


def stage_dedup(cfg: DictConfig) -> Path:
    from .dedup import geo_dedup, keep_priority, knn_edges, relative_dedup, self_dedup
    from .knn import knn

    rows = read_manifest(_require(pool_manifest(cfg), "dedup", "run the tile stage first"))
    x = _embeddings(cfg, "pool")
    if len(x) != len(rows):
        raise ValueError(f"dedup: {len(x)} pool embeddings for {len(rows)} manifest rows; re-run embed")
    n = len(rows)
    priority = keep_priority(rows, cfg.dedup.keep_policy)
    # 1. geographic: tiles whose footprints overlap (prefer the tile with fewer invalid pixels).
    geo_priority = priority - np.array([float(r.get("invalid_fraction") or 0.0) for r in rows])
    geo_keep, geo_labels = geo_dedup(rows, cfg.dedup.geo_iou, geo_priority)
    # 2. self-dedup on the embeddings, among the geo survivors.
    from .embed import unreadable_rows

    unreadable = np.zeros(n, bool)
    unreadable[unreadable_rows(out(cfg, "embeddings", "pool"))] = True  # the embed stage could not read them
    scores, ids = pool_knn(cfg, x)
    # Unreadable rows carry a blank descriptor: they join no edge and are never verified.
    ids = np.where(unreadable[:, None] | unreadable[np.maximum(ids, 0)], -1, ids)
    verification: dict = {}
    if cfg.dedup.verify.enabled:
        # Candidates from the kNN, copies decided from the pixels (verified_dedup.py).
        from .verified_dedup import verified_edges

        verification = verified_edges(cfg, rows, pool_manifest(cfg).parent, scores, ids, _descriptor_fn(cfg),
                                      readable=~unreadable)
        src, dst = verification["src"], verification["dst"]
        sims = verification["cand_score"][verification["cand_verified"]]
    else:
        src, dst, sims = knn_edges(scores, ids, cfg.dedup.threshold)
    self_keep, labels = self_dedup(n, src, dst, priority, active=geo_keep)
    removed_fraction = float((geo_keep & ~self_keep).sum()) / max(int(geo_keep.sum()), 1)
    if removed_fraction > cfg.dedup.max_removed_fraction:
        at = (f"dedup.verify.threshold={verification['summary']['verify_threshold']:.3f} "
              f"({verification['summary']['verify_threshold_source']})" if verification else f"dedup.threshold={cfg.dedup.threshold}")
        raise ValueError(f"dedup: self-dedup at {at} would remove {removed_fraction:.0%} of the pool "
                         f"(> dedup.max_removed_fraction={cfg.dedup.max_removed_fraction}); the threshold is too low for "
                         f"this pool (or the pool really is mostly copies: raise max_removed_fraction)")
    # 3. relative: pool components (at the stricter threshold) that touch a reference image.
    touched = np.zeros(n, bool)
    touched_by: dict[int, str] = {}
    rsrc, rdst, _ = knn_edges(scores, ids, cfg.dedup.relative_threshold)
    for i, _ in enumerate(cfg.dedup.reference_manifests):
        ref = _embeddings(cfg, f"reference_{i}")
        ref_scores, ref_ids = knn(ref, x, min(cfg.dedup.k, n), factory=cfg.dedup.index, nprobe=cfg.dedup.nprobe, seed=cfg.seed)
        hit = (ref_scores > cfg.dedup.relative_threshold) & (ref_ids >= 0)
        ref_rows = np.repeat(np.arange(len(ref)), ref_ids.shape[1])[hit.reshape(-1)]
        mask = relative_dedup(n, rsrc, rdst, ref_ids[hit], ref_rows)
        for r in np.flatnonzero(mask & ~touched):
            touched_by[int(r)] = f"reference_{i}"
        touched |= mask
    keep = geo_keep & self_keep & ~touched & ~unreadable
    comp_sizes = np.bincount(labels, minlength=n)
    reasons, removed = {}, {}
    for r in range(n):
        if keep[r]:
            size = int(comp_sizes[labels[r]])
            reasons[r] = (("unique: no candidate verified as a copy" if verification else
                           f"unique: no kNN neighbour with cosine > {cfg.dedup.threshold}") if size == 1 else
                          f"kept for a duplicate component of {size} (policy {cfg.dedup.keep_policy})")
        elif unreadable[r]:
            removed[r] = "unreadable"
        elif not geo_keep[r]:
            removed[r] = "geo"
        elif not self_keep[r]:
            removed[r] = "self"
        else:
            removed[r] = f"relative:{touched_by.get(r)}"
    atomic_write_json(out(cfg, "dedup", "removed.json"), {str(r): why for r, why in removed.items()})
    candidates = {k: v for k, v in verification.items() if k.startswith("cand_")}
    atomic_save_npz(out(cfg, "dedup", "result.npz"), keep=keep, labels=labels, geo_labels=geo_labels,
                    edge_src=src, edge_dst=dst, edge_sim=sims, top1=_top1(scores, ids), **candidates)
    if verification:
        atomic_write_json(out(cfg, "dedup", "calibration.json"), {**verification["calibration_scores"],
                                                                  "timing": verification["timing"]})
    summary = {"pool": n, "kept": int(keep.sum()), "removed_geo": int((~geo_keep).sum()),
               "removed_self": int((geo_keep & ~self_keep).sum()), "removed_relative": int((geo_keep & self_keep & touched).sum()),
               "removed_unreadable": int(unreadable.sum()),
               "threshold": cfg.dedup.threshold, "relative_threshold": cfg.dedup.relative_threshold, "geo_iou": cfg.dedup.geo_iou,
               "keep_policy": cfg.dedup.keep_policy, "k": cfg.dedup.k,
               **({"verification": verification["summary"]} if verification else {})}
    return write_selected(out(cfg, "dedup", "selected.json"), "dedup", np.flatnonzero(keep), reasons, summary)


def _descriptor_fn(cfg: DictConfig):
    """Images -> L2-normalised descriptors with the embed stage's embedder (calibration, region
    candidates). The embedder is built on first use and kept."""
    built: dict = {}

    def embed(images: list[np.ndarray]) -> np.ndarray:
        import torch

        from .embed import embed_images
        from .embedders import build_embedder
        from .images import resize_tensor
        from .knn import normalize

        if "spec" not in built:
            checkpoint = sscd_checkpoint(cfg) if cfg.embed.embedder == "sscd" else None
            built["spec"] = build_embedder(cfg.embed.embedder, img_size=cfg.embed.img_size, checkpoint=checkpoint, seed=cfg.seed)
        spec = built["spec"]
        batch = torch.stack([resize_tensor(torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32)), spec.img_size)
                             for im in images])
        with torch.no_grad():
            return normalize(embed_images(spec.module.eval(), batch, dihedral_pool=cfg.embed.dihedral_pool))
    return embed


def _top1(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Best non-self neighbour similarity of each row (for the report's histogram)."""
    own = ids == np.arange(len(ids))[:, None]
    masked = np.where(own | (ids < 0), -np.inf, scores)
    return masked.max(axis=1) if masked.shape[1] else np.full(len(ids), -np.inf)


def write_selected(path: Path, stage: str, rows: np.ndarray, reasons: dict[int, str], summary: dict) -> Path:
    return atomic_write_json(path, {"stage": stage, "rows": [int(r) for r in rows],
                                    "reasons": {str(int(r)): reasons[int(r)] for r in rows}, "summary": summary})


def read_selected(cfg: DictConfig, stage: str) -> dict:
    return read_json(_require(out(cfg, stage, "selected.json"), stage, f"run the {stage} stage first"))


def current_selection(cfg: DictConfig, before: str) -> dict:
    """The selection the stage ``before`` works on: the latest earlier stage that ran."""
    order = ["dedup", "retrieve", "sample"]
    for stage in reversed(order[: order.index(before)] if before in order else order):
        if out(cfg, stage, "selected.json").is_file():
            return read_json(out(cfg, stage, "selected.json"))
    raise FileNotFoundError(f"{before}: no earlier selection found under {cfg.output_dir}; run dedup first")


def stage_retrieve(cfg: DictConfig) -> Path:
    from .retrieve import cluster_based, sample_based

    base = read_selected(cfg, "dedup")
    rows = np.array(base["rows"], dtype=np.int64)
    if cfg.retrieve.mode == "none" or not cfg.retrieve.query_manifests:
        reasons = {int(r): "retrieval off: every dedup survivor passes" for r in rows}
        return write_selected(out(cfg, "retrieve", "selected.json"), "retrieve", rows, reasons, {"mode": "none"})
    x = _embeddings(cfg, "pool")[rows]
    chosen, reasons, stats = set(), {}, {}
    for i, _ in enumerate(cfg.retrieve.query_manifests):
        q = _embeddings(cfg, f"query_{i}")
        if cfg.retrieve.mode == "sample":
            local, st = sample_based(x, q, cfg.retrieve.k, factory=cfg.dedup.index, nprobe=cfg.dedup.nprobe)
            why = f"among the {cfg.retrieve.k} nearest neighbours of a query_{i} image"
        else:
            local, st = cluster_based(x, q, num_clusters=cfg.retrieve.num_clusters, min_queries=cfg.retrieve.min_queries,
                                      per_cluster=cfg.retrieve.per_cluster, cap=cfg.retrieve.cap_per_query_set,
                                      seed=cfg.seed, max_points_per_centroid=cfg.cluster.max_points_per_centroid)
            why = f"in a pool cluster holding > {cfg.retrieve.min_queries} query_{i} images"
        stats[f"query_{i}"] = st
        for r in rows[local]:
            reasons.setdefault(int(r), why)
            chosen.add(int(r))
    selected = np.array(sorted(chosen), dtype=np.int64)
    return write_selected(out(cfg, "retrieve", "selected.json"), "retrieve", selected, reasons,
                          {"mode": cfg.retrieve.mode, "sets": stats, "retrieved": len(selected)})


def stage_cluster(cfg: DictConfig) -> Path:
    from .hkmeans import hierarchical_kmeans

    base = current_selection(cfg, "sample")
    rows = np.array(base["rows"], dtype=np.int64)
    x = _embeddings(cfg, "pool")[rows]
    h = hierarchical_kmeans(x, list(cfg.cluster.levels), resampling_steps=cfg.cluster.resampling_steps,
                            resample_points=cfg.cluster.resample_points, niter=cfg.cluster.kmeans_iters, seed=cfg.seed,
                            max_points_per_centroid=cfg.cluster.max_points_per_centroid)
    arrays = {"rows": rows, "from_stage": np.array(base["stage"])}
    for l, (lab, cen) in enumerate(zip(h.labels, h.centroids)):
        arrays[f"labels_{l}"], arrays[f"centroids_{l}"] = lab, cen
    return atomic_save_npz(out(cfg, "cluster", "hierarchy.npz"), **arrays)


def load_hierarchy(cfg: DictConfig):
    from .hkmeans import Hierarchy

    data = np.load(_require(out(cfg, "cluster", "hierarchy.npz"), "sample", "run the cluster stage first"))
    levels = len([k for k in data.files if k.startswith("labels_")])
    h = Hierarchy(labels=[data[f"labels_{l}"] for l in range(levels)], centroids=[data[f"centroids_{l}"] for l in range(levels)])
    return h, data["rows"], str(data["from_stage"])


def stage_sample(cfg: DictConfig) -> Path:
    from .hkmeans import balance_stats, balanced_sample

    h, rows, from_stage = load_hierarchy(cfg)
    base = read_selected(cfg, from_stage)
    if list(base["rows"]) != rows.tolist():
        raise RuntimeError(f"sample: cluster/hierarchy.npz is stale ({from_stage} changed since); re-run cluster")
    target = int(cfg.sample.target_size or 0)
    target = len(rows) if target <= 0 else target
    picked = balanced_sample(h, target, seed=cfg.seed)
    leaf = h.labels[0]
    before = np.bincount(leaf, minlength=len(h.centroids[0]))
    after = np.bincount(leaf[picked], minlength=len(h.centroids[0]))
    reasons = {int(rows[p]): f"balanced sample: leaf cluster {int(leaf[p])} (size {int(before[leaf[p]])}, took {int(after[leaf[p]])})"
               for p in picked}
    summary = {"target_size": target, "selected": int(len(picked)), "levels": list(cfg.cluster.levels),
               "leaf_sizes_before": before.tolist(), "leaf_sizes_after": after.tolist(),
               "balance_before": balance_stats(before), "balance_after": balance_stats(after)}
    return write_selected(out(cfg, "sample", "selected.json"), "sample", rows[picked], reasons, summary)


def stage_export(cfg: DictConfig) -> Path:
    from .io import portable_path, resolve_row_path, write_manifest
    from .report import write_report

    manifest = pool_manifest(cfg)
    rows = read_manifest(manifest)
    history = {}
    final = None
    for stage in ("dedup", "retrieve", "sample"):
        path = out(cfg, stage, "selected.json")
        if path.is_file():
            sel = read_json(path)
            history[stage] = sel
            final = sel
    if final is None:
        raise FileNotFoundError(f"export: no stage selection under {cfg.output_dir}; run dedup first")
    # Refuse to combine selections made from other inputs or settings than the current ones.
    chain = ["embed"] + [s for s in SELECTION_STAGES if (s in history or (s == "cluster" and "sample" in history))]
    require_fresh(cfg, chain, by="export")
    export_dir = out(cfg, "export")
    entries = []
    for r in final["rows"]:
        entry = dict(rows[r])
        entry["path"] = portable_path(resolve_row_path(rows[r], manifest.parent), export_dir)
        steps = [{"stage": "tile", "reason": (rows[r].get("provenance") or {}).get("reason", "in the pool")}]
        steps += [{"stage": s, "reason": sel["reasons"][str(r)]} for s, sel in history.items() if str(r) in sel["reasons"]]
        entry["provenance"] = {"stage": final["stage"], "reason": final["reasons"][str(r)], "pool_row": int(r), "steps": steps}
        entries.append(entry)
    path = write_manifest(export_dir / "manifest.jsonl", entries)
    write_report(cfg, export_dir, history, num_pool=len(rows))
    return path


STAGES = {"tile": stage_tile, "embed": stage_embed, "dedup": stage_dedup, "retrieve": stage_retrieve,
          "cluster": stage_cluster, "sample": stage_sample, "export": stage_export}
PIPELINE = ["tile", "embed", "dedup", "retrieve", "cluster", "sample", "export"]


def run_stage(cfg: DictConfig, stage: str) -> None:
    from .config import save_resolved

    if stage not in STAGES and stage != "all":
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(PIPELINE)}, all")
    setup_threads(cfg)
    save_resolved(cfg, cfg.output_dir)
    for name in PIPELINE if stage == "all" else [stage]:
        log.info("curate: stage %s", name)
        inputs = stage_inputs(cfg, name)
        # A stage must not build on a stale selection (export checks the whole chain).
        require_fresh(cfg, [s for s in inputs if s in SELECTION_STAGES], by=name)
        STAGES[name](cfg)
        if name != "export":
            record_stage(cfg, name, inputs)


SELECTION_STAGES = ("dedup", "retrieve", "cluster", "sample")


def stage_inputs(cfg: DictConfig, stage: str) -> list[str]:
    """The stages whose outputs ``stage`` reads (their digests go into its stage record)."""
    if stage == "cluster":
        return [current_selection(cfg, "sample")["stage"], "embed"]
    return {"tile": [], "embed": ["tile"], "dedup": ["tile", "embed"], "retrieve": ["dedup", "embed"],
            "sample": ["cluster"], "export": []}[stage]
