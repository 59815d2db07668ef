"""Hierarchical k-means with resampling, and top-down balanced sampling (Vo et al. 2024).

Level 1 clusters the points; level l clusters the centroids of level l-1. After each k-means a
resampling step re-fits the level on the ``resample_points`` points nearest each centroid, which
moves centroids off dense modes towards an even cover of the data. Balanced sampling then walks
the tree top-down: a node's budget is split among its children with the cap x solving
sum_i min(x, size_i) = budget, so small (rare) clusters are kept whole and big ones are capped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .knn import assign, kmeans

log = logging.getLogger(__name__)


@dataclass
class Hierarchy:
    """``labels[l]``: cluster of each level-l node (level 0 nodes = points), ``centroids[l]``."""

    labels: list[np.ndarray]
    centroids: list[np.ndarray]

    def point_labels(self, level: int) -> np.ndarray:
        """Cluster at ``level`` (0-based over the cluster levels) of every point."""
        lab = self.labels[0]
        for l in range(1, level + 1):
            lab = self.labels[l][lab]
        return lab


def fit_level(x: np.ndarray, k: int, *, resampling_steps: int, resample_points: int, niter: int, seed: int,
              max_points_per_centroid: int) -> tuple[np.ndarray, np.ndarray]:
    """One level in RAM: k-means, ``resampling_steps`` re-fits on the ``resample_points`` points
    nearest each centroid, then (labels, centroids). The cluster stage runs level 1 sharded
    (stages_cluster.py, same steps and seeds) and this for the small levels above it."""
    centroids = kmeans(x, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid)
    for step in range(resampling_steps):
        labels, dist = assign(x, centroids)
        picked = []
        for c in range(k):
            members = np.flatnonzero(labels == c)
            if len(members):
                picked.append(members[np.argsort(dist[members], kind="stable")[:resample_points]])
        sample = x[np.concatenate(picked)]
        if len(sample) < k:
            break
        centroids = kmeans(sample, k, niter=niter, seed=seed + step + 1, max_points_per_centroid=max_points_per_centroid,
                           init_centroids=centroids)
    labels, _ = assign(x, centroids)
    return labels, centroids


def hierarchical_kmeans(x: np.ndarray, levels: Sequence[int], *, resampling_steps: int = 2, resample_points: int = 16,
                        niter: int = 20, seed: int = 0, max_points_per_centroid: int = 256) -> Hierarchy:
    """``levels`` = clusters per level, bottom up; each is clipped to the number of nodes below it."""
    labels, centroids = [], []
    nodes = np.ascontiguousarray(x, dtype=np.float32)
    for depth, k in enumerate(levels):
        k = min(int(k), len(nodes))
        lab, cen = fit_level(nodes, k, resampling_steps=resampling_steps, resample_points=resample_points,
                             niter=niter, seed=seed + 1000 * depth, max_points_per_centroid=max_points_per_centroid)
        labels.append(lab)
        centroids.append(cen)
        nodes = cen
    return Hierarchy(labels=labels, centroids=centroids)


def balanced_allocation(sizes: Sequence[int], target: int) -> np.ndarray:
    """Integer counts n_i <= size_i with sum = min(target, sum sizes), n_i = min(x, size_i) for the
    cap x solving sum_i min(x, size_i) = target; leftover units (from rounding x down) go to the
    largest clusters, so the result stays as even as possible."""
    sizes = np.asarray(sizes, dtype=np.int64)
    target = int(min(target, sizes.sum()))
    if target <= 0:
        return np.zeros_like(sizes)
    ordered = np.sort(sizes)
    # Cap between ordered[i-1] and ordered[i]: the i smallest are whole, the rest get x each.
    prefix = np.concatenate([[0], np.cumsum(ordered)])
    m = len(ordered)
    cap = int(ordered[-1])
    for i in range(m):
        remaining = target - prefix[i]
        if remaining <= (m - i) * ordered[i]:
            cap = remaining // (m - i)
            break
    counts = np.minimum(sizes, cap)
    leftover = target - int(counts.sum())
    if leftover > 0:
        room = np.flatnonzero(sizes > counts)
        room = room[np.argsort(-sizes[room], kind="stable")][:leftover]
        counts[room] += 1
    return counts


def balanced_sample(hierarchy: Hierarchy, target: int, *, seed: int = 0) -> np.ndarray:
    """Point indices of a balanced sample of ``target`` points (sorted)."""
    rng = np.random.default_rng(seed)
    top = len(hierarchy.labels) - 1
    num_points = len(hierarchy.labels[0])
    # children[l][c] = level-l nodes (points when l == 0) in cluster c of level l.
    children = [[np.flatnonzero(lab == c) for c in range(len(cen))] for lab, cen in zip(hierarchy.labels, hierarchy.centroids)]
    point_counts = [np.bincount(hierarchy.point_labels(l), minlength=len(hierarchy.centroids[l])) for l in range(top + 1)]

    def take(level: int, cluster: int, budget: int) -> list[np.ndarray]:
        kids = children[level][cluster]
        if level == 0:
            return [rng.choice(kids, size=budget, replace=False)] if budget else []
        sizes = point_counts[level - 1][kids]
        out = []
        for kid, n in zip(kids, balanced_allocation(sizes, budget)):
            out.extend(take(level - 1, int(kid), int(n)))
        return out

    roots = np.arange(len(hierarchy.centroids[top]))
    picked = []
    for root, n in zip(roots, balanced_allocation(point_counts[top][roots], min(target, num_points))):
        picked.extend(take(top, int(root), int(n)))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def balance_stats(sizes: np.ndarray) -> dict:
    """Entropy (nats; max log K) and max/min of nonzero cluster sizes."""
    sizes = np.asarray(sizes, dtype=np.float64)
    nz = sizes[sizes > 0]
    p = nz / nz.sum() if len(nz) else nz
    return {"clusters": int(len(nz)), "entropy": float(-(p * np.log(p)).sum()) if len(nz) else 0.0,
            "max_entropy": float(np.log(len(nz))) if len(nz) else 0.0,
            "max_over_min": float(nz.max() / nz.min()) if len(nz) else 0.0}
