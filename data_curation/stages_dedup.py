"""The dedup stage as a unit (units.py): six phases, three of them sharded.

knn_train (1 task)  train the IVF index once on a seeded sample (Flat: nothing to train); saved.
knn       (N)       database items of dedup.shard_size rows: each searches every query (sharded_knn.py).
regions   (N)       corner-square descriptors of the readable rows, 256 rows per item (regions.py).
pairs     (1 task)  merge the kNN items (dedup/knn.npz); calibrate; candidates (kNN + region kNN);
                    the background pairs of their images: every pair to align.
verify    (N)       pixel alignment of the pairs whose stable hash falls in this shard (verify.py).
graph     (1 task)  scores from the merged alignments, verified edges, connected components over
                    them, geographic and relative dedup, selected.json.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from omegaconf import DictConfig

from .fingerprint import record_stage
from .io import atomic_save_npy, atomic_save_npz, atomic_write_json, read_json, read_manifest
from .paths import embedding_store, embeddings_in_ram, out, pool_manifest, require, sscd_checkpoint, write_selected
from .progress import Progress
from .units import Phase, ShardContext, StageUnit, remove_other_work, stable_bucket

log = logging.getLogger(__name__)

REGION_BATCH = 256  # rows per region item (fixed: descriptors do not depend on the shard count)
VERIFY_CHUNK = 8192  # pairs per verification output file (a killed shard loses at most one chunk;
# large enough that verify_rows splits a chunk over num_threads spawned processes)


def _rows(cfg: DictConfig) -> list[dict]:
    return read_manifest(require(pool_manifest(cfg), "dedup", "run the tile stage first"))


def _readable(cfg: DictConfig, n: int) -> np.ndarray:
    from .embed import unreadable_rows

    readable = np.ones(n, bool)
    readable[unreadable_rows(out(cfg, "embeddings", "pool"))] = False  # the embed stage could not read them
    return readable


def _regions_on(cfg: DictConfig) -> bool:
    return bool(cfg.dedup.verify.enabled) and int(cfg.dedup.verify.region_k) > 0


def descriptor_fn(cfg: DictConfig):
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


# ---- knn ---------------------------------------------------------------------------------
def knn_train(ctx: ShardContext) -> None:
    from .sharded_knn import train_shared_index

    store = embedding_store(ctx.cfg, "pool")
    if len(store) != len(_rows(ctx.cfg)):
        raise ValueError(f"dedup: {len(store)} pool embeddings for {len(_rows(ctx.cfg))} manifest rows; re-run embed")
    factory = train_shared_index(store, factory=ctx.cfg.dedup.index, seed=ctx.cfg.seed, path=ctx.phase_dir / "index.faiss")
    atomic_write_json(ctx.phase_dir / "index.json", {"factory": factory, "rows": len(store)})


def knn_search(ctx: ShardContext) -> None:
    from .sharded_knn import item_ranges, search_item

    cfg = ctx.cfg
    store = embedding_store(cfg, "pool")
    k = min(cfg.dedup.k + 1, len(store))  # +1: the query itself comes back
    template = ctx.work / "knn_train" / "index.faiss"
    todo = ctx.pending(item_ranges(len(store), cfg.dedup.shard_size))
    with Progress(len(todo) * len(store), f"dedup knn[{ctx.shard}/{ctx.num_shards}]", unit="query",
                  enabled=cfg.embed.progress) as progress:
        for j, (start, stop) in todo:
            scores, ids = search_item(template, store, start, stop, k=k, nprobe=cfg.dedup.nprobe,
                                      query_batch=cfg.dedup.query_batch, progress=progress)
            atomic_save_npz(ctx.item_path(j), scores=scores, ids=ids)
            ctx.item_done()


def merged_knn(ctx: ShardContext) -> tuple[np.ndarray, np.ndarray]:
    """The pool's self-kNN, merged over the database items (dedup/knn.npz once merged)."""
    from .sharded_knn import item_ranges, merge_topk

    path = out(ctx.cfg, "dedup", "knn.npz")
    n = len(embedding_store(ctx.cfg, "pool"))
    items = ctx.finished_items("knn", len(item_ranges(n, ctx.cfg.dedup.shard_size)))
    parts = [np.load(p, mmap_mode="r") for p in items]
    scores, ids = merge_topk([(p["scores"], p["ids"]) for p in parts], min(ctx.cfg.dedup.k + 1, n))
    atomic_save_npz(path, scores=scores, ids=ids)
    return scores, ids


# ---- region candidates -----------------------------------------------------------------------
def region_items(cfg: DictConfig, readable: np.ndarray) -> list[np.ndarray]:
    rows = np.flatnonzero(readable)
    return [rows[s : s + REGION_BATCH] for s in range(0, len(rows), REGION_BATCH)]


def regions_embed(ctx: ShardContext) -> None:
    from .regions import corner_squares
    from .verified_dedup import row_loader

    cfg = ctx.cfg
    if not _regions_on(cfg):
        return
    rows = _rows(cfg)
    load = row_loader(rows, pool_manifest(cfg).parent, list(cfg.embed.bands) if cfg.embed.bands else None)
    embed = descriptor_fn(cfg)
    todo = ctx.pending(region_items(cfg, _readable(cfg, len(rows))), suffix=".npy")
    with Progress(sum(len(b) for _, b in todo), f"dedup regions[{ctx.shard}/{ctx.num_shards}]", unit="img",
                  enabled=cfg.embed.progress) as progress:
        for j, batch in todo:
            squares = [sq for r in batch for sq in corner_squares(load(int(r)), float(cfg.dedup.verify.region_side))]
            atomic_save_npy(ctx.item_path(j, suffix=".npy"), np.asarray(embed(squares), dtype=np.float32))
            progress.update(len(batch))
            ctx.item_done()


# ---- pairs -------------------------------------------------------------------------------
def make_pairs(ctx: ShardContext) -> None:
    from .background import neighbour_pairs
    from .regions import merge_candidates, region_pairs
    from .verified_dedup import calibrate_on_pool, candidate_pairs, row_loader
    from .verify import params_from_config

    cfg = ctx.cfg
    scores, ids = merged_knn(ctx)
    if not cfg.dedup.verify.enabled:
        return
    section = cfg.dedup.verify
    rows = _rows(cfg)
    readable = _readable(cfg, len(rows))
    ids = np.where(~readable[:, None] | ~readable[np.maximum(ids, 0)], -1, ids)
    params = params_from_config(section)
    load = row_loader(rows, pool_manifest(cfg).parent, list(cfg.embed.bands) if cfg.embed.bands else None)
    embed = descriptor_fn(cfg)
    t0 = time.time()
    need_verify, need_candidate = section.threshold is None, section.candidate_threshold is None
    calibration = (calibrate_on_pool(cfg, load, scores, ids, params, embed if need_candidate else None, readable)
                   if need_verify or need_candidate else {})
    calibrate_s = time.time() - t0
    verify_t = float(section.threshold) if not need_verify else float(calibration["verify_threshold"])
    cand_t = float(section.candidate_threshold) if not need_candidate else float(calibration.get("candidate_threshold", -1.0))
    src, dst, cos = candidate_pairs(scores, ids, k=int(section.k), threshold=cand_t)
    n_knn = len(src)
    if _regions_on(cfg):
        items = region_items(cfg, readable)
        x = np.concatenate([np.load(p) for p in ctx.finished_items("regions", len(items), suffix=".npy")]) if items else None
        owner = np.repeat(np.concatenate(items), 4) if items else np.zeros(0, np.int64)
        regions = region_pairs(x, owner, k=int(section.region_k), threshold=cand_t, side=float(section.region_side))
        src, dst, cos = merge_candidates((src, dst, cos), regions)
    # Candidates and the background pairs of their images are aligned together (background.py).
    bsrc, bdst = neighbour_pairs(np.concatenate([src, dst]), ids, int(section.background_neighbours))
    pairs = np.unique(np.concatenate([np.stack([src, dst], 1), np.stack([bsrc, bdst], 1)]).astype(np.int64).reshape(-1, 2), axis=0)
    atomic_save_npz(ctx.phase_dir / "pairs.npz", src=pairs[:, 0], dst=pairs[:, 1], cand_src=src, cand_dst=dst, cand_cos=cos)
    atomic_write_json(ctx.phase_dir / "pairs.json", {
        "verify_threshold": verify_t, "candidate_threshold": cand_t, "knn_candidates": int(n_knn),
        "verify_threshold_source": "config" if not need_verify else "calibrated",
        "candidate_threshold_source": "config" if not need_candidate else "calibrated",
        "calibration": calibration, "calibrate_seconds": round(calibrate_s, 2)})


# ---- verify --------------------------------------------------------------------------------
def verify_shard(ctx: ShardContext) -> None:
    from .verified_dedup import verify_rows
    from .verify import params_from_config

    cfg = ctx.cfg
    if not cfg.dedup.verify.enabled:
        return
    pairs = np.load(ctx.work / "pairs" / "pairs.npz")
    src, dst = pairs["src"], pairs["dst"]
    mine = np.flatnonzero(stable_bucket(src, dst, ctx.num_shards) == ctx.shard)
    chunks = [mine[s : s + VERIFY_CHUNK] for s in range(0, len(mine), VERIFY_CHUNK)]
    todo = [(c, idx) for c, idx in enumerate(chunks) if not (ctx.phase_dir / f"s{ctx.shard:05d}_c{c:05d}.npz").is_file()]
    rows = _rows(cfg)
    params = params_from_config(cfg.dedup.verify)
    bands = list(cfg.embed.bands) if cfg.embed.bands else None
    with Progress(sum(len(i) for _, i in todo), f"dedup verify[{ctx.shard}/{ctx.num_shards}]", unit="pair",
                  enabled=cfg.embed.progress) as progress:
        for c, idx in todo:
            t0 = time.time()
            _, al = verify_rows(src[idx], dst[idx], rows, pool_manifest(cfg).parent, bands, params,
                                workers=int(cfg.num_threads))
            atomic_save_npz(ctx.phase_dir / f"s{ctx.shard:05d}_c{c:05d}.npz", index=idx,
                            peak=np.array([a.peak for a in al], np.float64), sidelobe=np.array([a.sidelobe for a in al], np.float64),
                            dihedral=np.array([a.dihedral for a in al], np.int64), scale=np.array([a.scale for a in al], np.float64),
                            seconds=np.array(time.time() - t0))
            progress.update(len(idx))
            ctx.item_done()


def merged_verification(ctx: ShardContext) -> dict:
    """Alignment results of every pair, from whichever shards computed them (scores as verified_dedup did)."""
    from .background import background_levels, normalised_scores
    from .verify import params_from_config

    cfg = ctx.cfg
    section = cfg.dedup.verify
    pairs = np.load(ctx.work / "pairs" / "pairs.npz")
    info = read_json(ctx.work / "pairs" / "pairs.json")
    src, dst = pairs["src"], pairs["dst"]
    peak, sidelobe = np.full(len(src), np.nan), np.full(len(src), np.nan)
    dihedral, scale = np.zeros(len(src), np.int64), np.ones(len(src))
    seconds = 0.0
    for path in sorted((ctx.work / "verify").glob("s*_c*.npz")):
        part = np.load(path)
        idx = part["index"]
        peak[idx], sidelobe[idx], dihedral[idx], scale[idx] = part["peak"], part["sidelobe"], part["dihedral"], part["scale"]
        seconds += float(part["seconds"])
    if np.isnan(peak).any():
        raise RuntimeError(f"dedup: {int(np.isnan(peak).sum())} pairs have no verification result; re-run the verify shards")
    weight = params_from_config(section).background_weight
    scores = np.zeros(0)
    if len(src):
        bg_src, bg_dst = background_levels(src, dst, peak, rank=int(section.background_rank))
        scores = normalised_scores(peak, sidelobe, np.maximum(bg_src, bg_dst), weight=weight)
    position = {(int(a), int(b)): e for e, (a, b) in enumerate(zip(src, dst))}
    where = np.array([position[(int(a), int(b))] for a, b in zip(pairs["cand_src"], pairs["cand_dst"])], dtype=np.int64)
    cand_score = scores[where] if len(where) else np.zeros(0)
    verified = cand_score > info["verify_threshold"]
    calibration = info["calibration"]
    summary = {"verify_threshold": info["verify_threshold"], "candidate_threshold": info["candidate_threshold"],
               "verify_threshold_source": info["verify_threshold_source"],
               "candidate_threshold_source": info["candidate_threshold_source"],
               "candidates": int(len(where)), "knn_candidates": info["knn_candidates"],
               "aligned_pairs": int(len(src)), "verified": int(verified.sum()),
               "verify_k": int(section.k), "region_k": int(section.region_k), "region_side": float(section.region_side),
               "background_neighbours": int(section.background_neighbours), "background_rank": int(section.background_rank),
               "verify_params": params_from_config(section).as_dict(),
               "calibration": {k: v for k, v in calibration.items() if not k.endswith(("_scores", "_kinds"))}}
    timing = {"verify_seconds": round(seconds, 2), "verify_ms_per_aligned_pair": round(1000 * seconds / max(len(src), 1), 2),
              "calibrate_seconds": info["calibrate_seconds"], "candidates": int(len(where)), "aligned_pairs": int(len(src))}
    log.info("dedup: %d candidate pairs (%d aligned with background pairs), %d verified as copies (threshold %.3f), "
             "%.1f ms/aligned pair (summed over shards)", len(where), len(src), int(verified.sum()), info["verify_threshold"],
             timing["verify_ms_per_aligned_pair"])
    cand_src, cand_dst = pairs["cand_src"], pairs["cand_dst"]
    return {"src": cand_src[verified], "dst": cand_dst[verified], "cand_src": cand_src, "cand_dst": cand_dst,
            "cand_cos": pairs["cand_cos"], "cand_score": cand_score, "cand_verified": verified,
            "cand_dihedral": dihedral[where], "cand_scale": scale[where],
            "calibration_scores": calibration, "summary": summary, "timing": timing}


# ---- graph ---------------------------------------------------------------------------------
def dedup_graph(ctx: ShardContext) -> None:
    from .stages_dedup_graph import write_dedup

    data = np.load(out(ctx.cfg, "dedup", "knn.npz"))
    verification = merged_verification(ctx) if ctx.cfg.dedup.verify.enabled else {}
    write_dedup(ctx.cfg, data["scores"], data["ids"], verification, embeddings_in_ram)
    record_stage(ctx.cfg, "dedup", ["tile", "embed"])
    remove_other_work(ctx)


DEDUP = StageUnit("dedup", (Phase("knn_train", knn_train), Phase("knn", knn_search, sharded=True),
                            Phase("regions", regions_embed, sharded=True), Phase("pairs", make_pairs),
                            Phase("verify", verify_shard, sharded=True), Phase("graph", dedup_graph)),
                  inputs=lambda cfg: ["tile", "embed"])
