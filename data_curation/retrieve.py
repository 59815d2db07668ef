"""Retrieval of pool images close to curated query sets (DINOv2 section 3).

- sample-based: the k nearest pool images of every query image (large query sets);
- cluster-based: k-means on the pool; each cluster holding more than ``min_queries`` query
  images contributes up to ``per_cluster`` of its images (a seeded random subset), and one query
  set contributes at most ``cap`` images in all.
"""
from __future__ import annotations

import numpy as np

from .knn import assign, brute_force_knn, kmeans, knn


def sample_based(pool: np.ndarray, queries: np.ndarray, k: int, *, factory: str = "auto", nprobe: int = 16,
                 exact: bool = False) -> tuple[np.ndarray, dict]:
    """(sorted unique pool rows, stats incl. the collision rate = 1 - unique / retrieved)."""
    if exact:
        _, ids = brute_force_knn(queries, pool, k)
    else:
        _, ids = knn(queries, pool, k, factory=factory, nprobe=nprobe)
    flat = ids[ids >= 0]
    unique = np.unique(flat)
    return unique, {"retrieved": int(flat.size), "unique": int(unique.size),
                    "collision_rate": float(1 - unique.size / max(flat.size, 1))}


def cluster_based(pool: np.ndarray, queries: np.ndarray, *, num_clusters: int, min_queries: int, per_cluster: int,
                  cap: int, seed: int = 0, niter: int = 20, max_points_per_centroid: int = 256) -> tuple[np.ndarray, dict]:
    k = min(num_clusters, len(pool))
    centroids = kmeans(pool, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid)
    pool_labels, _ = assign(pool, centroids)
    query_counts = np.bincount(assign(queries, centroids)[0], minlength=k)
    rng = np.random.default_rng(seed)
    picked = []
    hot = np.flatnonzero(query_counts > min_queries)
    for c in hot:
        members = np.flatnonzero(pool_labels == c)
        picked.append(members if len(members) <= per_cluster else rng.choice(members, per_cluster, replace=False))
    rows = np.unique(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    if len(rows) > cap:
        rows = np.sort(rng.choice(rows, cap, replace=False))
    return rows, {"clusters": int(k), "clusters_selected": int(len(hot)), "retrieved": int(len(rows))}
