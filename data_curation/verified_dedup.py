"""Two-stage self-dedup: kNN candidates (recall) -> pixel verification (precision).

The kNN stage proposes each image's ``dedup.verify.k`` nearest neighbours whose cosine is above
the candidate threshold, and regions.py adds pairs that share a corner square (shifted windows);
verify.py aligns every candidate pair and only pairs scoring above the verification threshold
become union-find edges. Both thresholds are calibrated on the pool (calibrate.py) unless the
config sets them.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from omegaconf import DictConfig

from .background import align_with_background, score_pairs
from .calibrate import calibrate
from .images import load_row_image
from .regions import merge_candidates, region_candidates
from .verify import VerifyParams, params_from_config, verify_pairs

log = logging.getLogger(__name__)


def candidate_pairs(scores: np.ndarray, ids: np.ndarray, *, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, cosine) of each row's first ``k`` non-self neighbours above ``threshold``, i < j unique."""
    n = len(ids)
    rows = np.repeat(np.arange(n), ids.shape[1]).reshape(ids.shape)
    valid = (ids >= 0) & (ids != rows)
    rank = np.cumsum(valid, axis=1)  # 1-based rank among the real neighbours
    keep = valid & (rank <= k) & (scores > threshold)
    a, b, s = rows[keep], ids[keep], scores[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    if len(lo) == 0:
        return lo.astype(np.int64), hi.astype(np.int64), s
    pairs, first = np.unique(np.stack([lo, hi], 1), axis=0, return_index=True)
    return pairs[:, 0], pairs[:, 1], s[first]


def _verify_chunk(job: tuple) -> list:
    """Worker: alignments of one chunk of pairs (rows holds only the rows the chunk needs)."""
    rows, manifest_dir, bands, params, src, dst = job
    _, alignments = verify_pairs(src, dst, lambda i: load_row_image(rows[i], manifest_dir, bands), params)
    return alignments


def verify_rows(src: np.ndarray, dst: np.ndarray, rows: Sequence[dict], manifest_dir: Path, bands: Sequence[int] | None,
                params: VerifyParams, *, workers: int = 1, chunk: int = 512) -> tuple[np.ndarray, list]:
    """verify_pairs over manifest rows, split over ``workers`` spawned processes when there are
    enough pairs to pay for starting them (each pair runs single-threaded)."""
    if workers <= 1 or len(src) < 4 * chunk:
        return verify_pairs(src, dst, row_loader(rows, manifest_dir, bands), params)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for start in range(0, len(src), chunk):
        s, d = src[start : start + chunk], dst[start : start + chunk]
        needed = {int(i): rows[int(i)] for i in np.unique(np.concatenate([s, d]))}
        jobs.append((needed, manifest_dir, bands, params, s, d))
    # Spawned, never forked: faiss/torch OpenMP state does not survive fork.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        alignments = [a for part in pool.map(_verify_chunk, jobs) for a in part]
    return np.array([a.score for a in alignments], dtype=np.float64), alignments


def row_loader(rows: Sequence[dict], manifest_dir: Path, bands: Sequence[int] | None) -> Callable[[int], np.ndarray]:
    return lambda i: load_row_image(rows[i], manifest_dir, bands)


def calibrate_on_pool(cfg: DictConfig, load: Callable[[int], np.ndarray], scores: np.ndarray, ids: np.ndarray,
                      params: VerifyParams, embed: Callable[[list[np.ndarray]], np.ndarray] | None,
                      readable: np.ndarray | None = None) -> dict:
    """Sample ``dedup.verify.calibration_images`` pool images; negatives = each one against its
    nearest ``background_neighbours`` kNN neighbours (the same background the pipeline uses)."""
    section = cfg.dedup.verify
    pickable = np.arange(len(ids)) if readable is None else np.flatnonzero(readable)
    rng = np.random.default_rng(cfg.seed)
    picks = np.sort(rng.choice(pickable, min(len(pickable), int(section.calibration_images)), replace=False))
    local = {int(r): i for i, r in enumerate(picks)}
    extra: list[int] = []
    pairs = []
    for r in picks.tolist():
        neighbours = [int(j) for j in ids[r] if j >= 0 and j != r][: int(section.background_neighbours)]
        for j in neighbours:
            if j not in local:
                local[j] = len(picks) + len(extra)
                extra.append(j)
            pairs.append((local[r], local[j]))
    order = picks.tolist() + extra
    images = [load(i) for i in order]
    sampled = images[: len(picks)]
    # Only the sampled images get synthetic copies; neighbours only serve as negatives.
    report = calibrate(sampled, np.array(pairs, dtype=np.int64), params, embed=embed,
                       target_recall=float(section.target_recall), fp_weight=float(section.fp_weight), seed=cfg.seed,
                       negative_images=images, background_rank=int(section.background_rank))
    return report


def verified_edges(cfg: DictConfig, rows: Sequence[dict], manifest_dir: Path, scores: np.ndarray, ids: np.ndarray,
                   embed: Callable[[list[np.ndarray]], np.ndarray] | None, *, readable: np.ndarray | None = None) -> dict:
    """Candidates, calibration and verification (``readable``: rows the embed stage could read).
    Returns a dict with the verified edges
    (src, dst), every candidate (cand_src, cand_dst, cand_cos, cand_score, cand_verified) and the
    summary (thresholds, counts, seconds)."""
    section = cfg.dedup.verify
    params = params_from_config(section)
    load = row_loader(rows, manifest_dir, list(cfg.embed.bands) if cfg.embed.bands else None)
    calibration: dict = {}
    t0 = time.time()
    need_verify = section.threshold is None
    need_candidate = section.candidate_threshold is None
    if need_verify or need_candidate:
        calibration = calibrate_on_pool(cfg, load, scores, ids, params, embed if need_candidate else None, readable)
    calibrate_s = time.time() - t0
    verify_t = float(section.threshold) if not need_verify else float(calibration["verify_threshold"])
    cand_t = float(section.candidate_threshold) if not need_candidate else float(calibration.get("candidate_threshold", -1.0))
    src, dst, cos = candidate_pairs(scores, ids, k=int(section.k), threshold=cand_t)
    n_knn_candidates = len(src)
    t_regions = time.time()
    if int(section.region_k) > 0 and embed is not None:
        pickable = np.arange(len(rows)) if readable is None else np.flatnonzero(readable)
        regions = region_candidates(load, pickable, embed, side=float(section.region_side), k=int(section.region_k),
                                    threshold=cand_t)
        src, dst, cos = merge_candidates((src, dst, cos), regions)
    regions_s = time.time() - t_regions
    t1 = time.time()
    bands = list(cfg.embed.bands) if cfg.embed.bands else None
    # Candidates and the background pairs of their images are aligned together (background.py).
    all_src, all_dst, all_alignments = align_with_background(
        src, dst, ids, int(section.background_neighbours),
        lambda a, b: verify_rows(a, b, rows, manifest_dir, bands, params, workers=int(cfg.num_threads))[1])
    all_scores = score_pairs(all_src, all_dst, all_alignments, rank=int(section.background_rank), weight=params.background_weight)
    position = {(int(a), int(b)): e for e, (a, b) in enumerate(zip(all_src, all_dst))}
    where = np.array([position[(int(a), int(b))] for a, b in zip(src, dst)], dtype=np.int64)
    pair_scores = all_scores[where] if len(where) else np.zeros(0)
    alignments = [all_alignments[e] for e in where]
    verify_s = time.time() - t1
    verified = pair_scores > verify_t
    log.info("dedup: %d candidate pairs (%d aligned with background pairs), %d verified as copies (threshold %.3f), "
             "%.1f ms/aligned pair", len(src), len(all_src), int(verified.sum()), verify_t, 1000 * verify_s / max(len(all_src), 1))
    summary = {"verify_threshold": verify_t, "candidate_threshold": cand_t,
               "verify_threshold_source": "config" if not need_verify else "calibrated",
               "candidate_threshold_source": "config" if not need_candidate else "calibrated",
               "candidates": int(len(src)), "knn_candidates": int(n_knn_candidates),
               "aligned_pairs": int(len(all_src)), "verified": int(verified.sum()),
               "verify_k": int(section.k), "region_k": int(section.region_k), "region_side": float(section.region_side),
               "background_neighbours": int(section.background_neighbours),
               "background_rank": int(section.background_rank),
               "verify_params": params.as_dict(),
               "calibration": {k: v for k, v in calibration.items() if not k.endswith(("_scores", "_kinds"))}}
    # Timings vary run to run: kept out of the (deterministic) selection summary.
    timing = {"verify_seconds": round(verify_s, 2), "verify_ms_per_aligned_pair": round(1000 * verify_s / max(len(all_src), 1), 2),
              "calibrate_seconds": round(calibrate_s, 2), "region_candidates_seconds": round(regions_s, 2),
              "candidates": int(len(src)), "aligned_pairs": int(len(all_src))}
    return {"src": src[verified], "dst": dst[verified], "cand_src": src, "cand_dst": dst, "cand_cos": cos,
            "cand_score": pair_scores, "cand_verified": verified,
            "cand_dihedral": np.array([a.dihedral for a in alignments], np.int64),
            "cand_scale": np.array([a.scale for a in alignments], np.float64),
            "calibration_scores": calibration, "summary": summary, "timing": timing}
