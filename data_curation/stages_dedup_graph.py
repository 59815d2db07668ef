"""The dedup stage's last phase: from the merged kNN (and verified pairs) to ``dedup/selected.json``.

Geographic dedup first (footprints), then the self-dedup graph (verified pairs, or kNN edges above
dedup.threshold) as connected components over the merged shard outputs, then relative dedup
against the reference sets. One process: its inputs are edges, not embeddings.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from omegaconf import DictConfig

from .dedup import geo_dedup, keep_priority, knn_edges, relative_dedup, self_dedup
from .io import atomic_save_npz, atomic_write_json, read_manifest
from .paths import out, pool_manifest, write_selected


def top1(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Best non-self neighbour similarity of each row (for the report's histogram)."""
    own = ids == np.arange(len(ids))[:, None]
    masked = np.where(own | (ids < 0), -np.inf, scores)
    return masked.max(axis=1) if masked.shape[1] else np.full(len(ids), -np.inf)


def write_dedup(cfg: DictConfig, scores: np.ndarray, ids: np.ndarray, verification: dict,
                embeddings: Callable[..., np.ndarray]) -> None:
    """Everything after the kNN and the verification; ``embeddings(cfg, name)`` loads a set."""
    from .embed import unreadable_rows
    from .knn import knn

    rows = read_manifest(pool_manifest(cfg))
    n = len(rows)
    priority = keep_priority(rows, cfg.dedup.keep_policy)
    # 1. geographic: tiles whose footprints overlap (prefer the tile with fewer invalid pixels).
    geo_priority = priority - np.array([float(r.get("invalid_fraction") or 0.0) for r in rows])
    geo_keep, geo_labels = geo_dedup(rows, cfg.dedup.geo_iou, geo_priority)
    unreadable = np.zeros(n, bool)
    unreadable[unreadable_rows(out(cfg, "embeddings", "pool"))] = True
    # Unreadable rows carry a blank descriptor: they join no edge and are never verified.
    ids = np.where(unreadable[:, None] | unreadable[np.maximum(ids, 0)], -1, ids)
    # 2. self-dedup among the geo survivors: connected components over the (merged) edges.
    if verification:
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
    if cfg.dedup.reference_manifests:
        x = embeddings(cfg, "pool")  # FAISS needs the whole pool as its database here
    for i, _ in enumerate(cfg.dedup.reference_manifests):
        ref = embeddings(cfg, f"reference_{i}")
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
                    edge_src=src, edge_dst=dst, edge_sim=sims, top1=top1(scores, ids), **candidates)
    if verification:
        atomic_write_json(out(cfg, "dedup", "calibration.json"), {**verification["calibration_scores"],
                                                                  "timing": verification["timing"]})
    summary = {"pool": n, "kept": int(keep.sum()), "removed_geo": int((~geo_keep).sum()),
               "removed_self": int((geo_keep & ~self_keep).sum()), "removed_relative": int((geo_keep & self_keep & touched).sum()),
               "removed_unreadable": int(unreadable.sum()),
               "threshold": cfg.dedup.threshold, "relative_threshold": cfg.dedup.relative_threshold, "geo_iou": cfg.dedup.geo_iou,
               "keep_policy": cfg.dedup.keep_policy, "k": cfg.dedup.k,
               **({"verification": verification["summary"]} if verification else {})}
    write_selected(out(cfg, "dedup", "selected.json"), "dedup", np.flatnonzero(keep), reasons, summary)
