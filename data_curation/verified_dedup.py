"""Two-stage self-dedup: kNN candidates (recall) -> pixel verification (precision).

The kNN stage proposes each image's ``dedup.verify.k`` nearest neighbours whose cosine is above
the candidate threshold, and regions.py adds pairs that share a corner square (shifted windows);
verify.py aligns every candidate pair and only pairs scoring above the verification threshold
become union-find edges (the phases that do it, sharded: stages_dedup.py). Both thresholds are calibrated on the pool (calibrate.py) unless the
config sets them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from omegaconf import DictConfig

from .calibrate import calibrate
from .images import load_row_image
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
