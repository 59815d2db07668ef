"""Retrieval of pool images close to curated query sets (DINOv2 section 3).

- sample-based: the k nearest pool images of every query image (large query sets);
- cluster-based: k-means on the pool; each cluster holding more than ``min_queries`` query
  images contributes up to ``per_cluster`` of its images (a seeded random subset), and one query
  set contributes at most ``cap`` images in all.

These are the in-RAM building blocks; the retrieve stage (stages_retrieve.py) runs the same
steps with the pool sharded and gives the same rows.
"""
from __future__ import annotations

import numpy as np

from .knn import assign, brute_force_knn, kmeans, knn


KMEANS_ITERS = 20  # k-means iterations of the cluster-based retrieval


def union_of_neighbours(ids: np.ndarray) -> tuple[np.ndarray, dict]:
    """(sorted unique ids of a (Q, k) kNN result, stats incl. the collision rate = 1 - unique / retrieved)."""
    flat = ids[ids >= 0]
    unique = np.unique(flat)
    return unique, {"retrieved": int(flat.size), "unique": int(unique.size),
                    "collision_rate": float(1 - unique.size / max(flat.size, 1))}


def sample_based(pool: np.ndarray, queries: np.ndarray, k: int, *, factory: str = "auto", nprobe: int = 16,
                 exact: bool = False, seed: int = 0) -> tuple[np.ndarray, dict]:
    """(sorted unique pool rows, stats incl. the collision rate = 1 - unique / retrieved)."""
    if exact:
        _, ids = brute_force_knn(queries, pool, k)
    else:
        _, ids = knn(queries, pool, k, factory=factory, nprobe=nprobe, seed=seed)
    return union_of_neighbours(ids)


def select_from_clusters(pool_labels: np.ndarray, query_labels: np.ndarray, k: int, *, min_queries: int,
                         per_cluster: int, cap: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Clusters holding more than ``min_queries`` queries give up to ``per_cluster`` seeded-random
    members each; at most ``cap`` rows in all. (sorted pool positions, stats)."""
    query_counts = np.bincount(query_labels, minlength=k)
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


def cluster_based(pool: np.ndarray, queries: np.ndarray, *, num_clusters: int, min_queries: int, per_cluster: int,
                  cap: int, seed: int = 0, niter: int = KMEANS_ITERS,
                  max_points_per_centroid: int = 256) -> tuple[np.ndarray, dict]:
    """k-means on the pool (in RAM), then ``select_from_clusters``: (sorted pool positions, stats)."""
    k = min(num_clusters, len(pool))
    centroids = kmeans(pool, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid)
    pool_labels, _ = assign(pool, centroids)
    return select_from_clusters(pool_labels, assign(queries, centroids)[0], k, min_queries=min_queries,
                                per_cluster=per_cluster, cap=cap, seed=seed)
