"""Deduplication: union-find components of a similarity graph, and the three dedup kinds.

- self-dedup: kNN (k=64) on L2-normalised embeddings, exact scores, edges with cosine >
  threshold, connected components, one image kept per component (``keep_policy``:
  ``largest`` = most pixels, so an original beats its crops, ties -> lowest row; ``first`` =
  lowest row).
- relative dedup: pool + reference nodes in one graph at the (stricter) relative threshold; every
  pool component touching a reference image is dropped whole.
- geographic dedup: tiles of one CRS whose footprints overlap with IoU above a threshold;
  greedy by priority, a tile is dropped when it overlaps a kept one. Run first, it needs no embeddings.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return int(a)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def union_edges(self, src: np.ndarray, dst: np.ndarray) -> None:
        for a, b in zip(src.tolist(), dst.tolist()):
            self.union(a, b)

    def labels(self) -> np.ndarray:
        """Component id of every node = its root (fully compressed)."""
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def knn_edges(scores: np.ndarray, ids: np.ndarray, threshold: float, *, query_offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, score) of the kNN pairs above ``threshold`` (self-matches dropped, i<j unique)."""
    rows = np.repeat(np.arange(len(ids)) + query_offset, ids.shape[1])
    cols = ids.reshape(-1)
    vals = scores.reshape(-1)
    keep = (cols >= 0) & (cols != rows) & (vals > threshold)
    src, dst, vals = rows[keep], cols[keep], vals[keep]
    a, b = np.minimum(src, dst), np.maximum(src, dst)
    if len(a) == 0:
        return a, b, vals
    pairs, first = np.unique(np.stack([a, b], 1), axis=0, return_index=True)
    return pairs[:, 0], pairs[:, 1], vals[first]


def components(num_nodes: int, src: np.ndarray, dst: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """Component label per node from the edges among ``active`` nodes (inactive nodes stay alone)."""
    if active is not None:
        keep = active[src] & active[dst]
        src, dst = src[keep], dst[keep]
    uf = UnionFind(num_nodes)
    uf.union_edges(src, dst)
    return uf.labels()


def pick_representatives(labels: np.ndarray, priority: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """Boolean keep-mask: per component the active node of highest ``priority`` (ties -> lowest index)."""
    n = len(labels)
    active = np.ones(n, bool) if active is None else active
    idx = np.flatnonzero(active)
    # lexsort: last key is primary -> by label, then by -priority, then by index.
    order = idx[np.lexsort((idx, -priority[idx], labels[idx]))]
    first = np.ones(len(order), bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    keep = np.zeros(n, bool)
    keep[order[first]] = True
    return keep


def keep_priority(rows: Sequence[dict], policy: str) -> np.ndarray:
    if policy == "first":
        return np.zeros(len(rows))
    if policy == "largest":
        return np.array([float(r.get("width") or 0) * float(r.get("height") or 0) for r in rows])
    raise ValueError(f"dedup.keep_policy: unknown policy {policy!r} (largest | first)")


def self_dedup(num_nodes: int, src: np.ndarray, dst: np.ndarray, priority: np.ndarray,
               active: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, component labels) for the graph of above-threshold edges."""
    labels = components(num_nodes, src, dst, active)
    return pick_representatives(labels, priority, active), labels


def relative_dedup(num_pool: int, pool_src: np.ndarray, pool_dst: np.ndarray, ref_pool_ids: np.ndarray,
                   ref_ids: np.ndarray) -> np.ndarray:
    """Boolean mask of pool nodes whose component (pool edges + pool-reference edges) touches a
    reference. Reference j is node num_pool + j; ``ref_pool_ids[e]`` -- ``ref_ids[e]`` are the
    pool-reference edges above the relative threshold."""
    num_ref = int(ref_ids.max()) + 1 if len(ref_ids) else 0
    src = np.concatenate([pool_src, ref_pool_ids]).astype(np.int64)
    dst = np.concatenate([pool_dst, num_pool + ref_ids]).astype(np.int64)
    labels = components(num_pool + num_ref, src, dst)
    touched = np.zeros(num_pool + num_ref, bool)
    touched[np.unique(labels[num_pool:])] = True
    return touched[labels[:num_pool]]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box a = (minx, miny, maxx, maxy) with boxes b (M, 4)."""
    ix = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-30), 0.0)


def footprint_pairs(rows: Sequence[dict], min_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, iou) of footprints in one CRS overlapping with IoU > ``min_iou`` (sweep over x)."""
    src, dst, ious = [], [], []
    by_crs: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row.get("bounds") and row.get("crs"):
            by_crs.setdefault(str(row["crs"]), []).append(i)
    for members in by_crs.values():
        ids = np.array(members)
        boxes = np.array([_box(rows[i]["bounds"]) for i in members], dtype=np.float64)
        order = np.argsort(boxes[:, 0], kind="stable")
        ids, boxes = ids[order], boxes[order]
        for p in range(len(ids)):
            # Only boxes starting before this one ends can overlap it.
            end = np.searchsorted(boxes[:, 0], boxes[p, 2], side="left")
            if end <= p + 1:
                continue
            iou = box_iou(boxes[p], boxes[p + 1 : end])
            hit = np.flatnonzero(iou > min_iou)
            src.extend([ids[p]] * len(hit))
            dst.extend(ids[p + 1 + hit].tolist())
            ious.extend(iou[hit].tolist())
    return np.array(src, np.int64), np.array(dst, np.int64), np.array(ious)


def _box(bounds: Sequence[float]) -> tuple[float, float, float, float]:
    left, bottom, right, top = (float(v) for v in bounds)
    return (min(left, right), min(bottom, top), max(left, right), max(bottom, top))


def geo_dedup(rows: Sequence[dict], iou_threshold: float, priority: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, overlap-component labels) of geographic dedup (footprint IoU > threshold).

    Greedy, like non-maximum suppression: tiles are visited by priority (ties: lowest row) and
    kept unless they overlap an already kept tile. Unlike one-per-component, a chain of tiles
    that each overlap only their neighbours (A~B~C, A and C disjoint) keeps A and C: the area
    stays covered."""
    n = len(rows)
    src, dst, _ = footprint_pairs(rows, iou_threshold)
    neighbours: dict[int, list[int]] = {}
    for a, b in zip(src.tolist(), dst.tolist()):
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    keep = np.zeros(n, bool)  # only visited tiles can be True, so a True neighbour was kept earlier
    for node in np.lexsort((np.arange(n), -np.asarray(priority, dtype=np.float64))).tolist():
        if not any(keep[m] for m in neighbours.get(node, ())):
            keep[node] = True
    return keep, components(n, src, dst)
