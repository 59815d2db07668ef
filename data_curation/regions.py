"""Region candidates: pairs of images sharing a large region, for the copies a whole-image
descriptor ranks too low (shifted windows of homogeneous scenes above all).

A window shifted by a quarter of the tile shares three quarters of its pixels with the original,
but its whole-image descriptor also sees a quarter of new content; in a pool of look-alike tiles
(forest, fields, water) that is enough to push the copy below an image's first neighbours. Each
image's four corner squares of ``side`` (0.75) of the tile are embedded with the same embedder:
a window shifted by up to (1 - side) of the tile along either axis shares a corner square, pixel
for pixel, with the original (the original's top-right square is the shifted copy's top-left one).
A kNN over all corner squares proposes the images whose squares are each other's nearest ones.
Only proposals: verify.py still decides from the pixels.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

CORNERS = 4


def corner_squares(image: np.ndarray, side: float) -> list[np.ndarray]:
    """The four corner squares of a (C, H, W) image, each ``side`` of the shorter edge."""
    _, h, w = image.shape
    s = max(1, int(round(side * min(h, w))))
    return [image[:, top : top + s, left : left + s] for top in (0, h - s) for left in (0, w - s)]


def region_candidates(load: Callable[[int], np.ndarray], rows: Sequence[int],
                      embed: Callable[[list[np.ndarray]], np.ndarray], *, side: float, k: int, threshold: float,
                      batch: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, cosine) of image pairs, src < dst, where a corner square of one is among the
    first ``k`` squares of other images nearest to a corner square of the other, with cosine above
    ``threshold`` (the best such cosine per pair). ``rows``: the images to consider (row numbers
    passed to ``load``); ``embed``: images -> L2-normalised descriptors."""
    rows = np.asarray(rows, dtype=np.int64)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if len(rows) < 2:
        return empty
    parts = []
    for start in range(0, len(rows), batch):
        squares = [sq for r in rows[start : start + batch] for sq in corner_squares(load(int(r)), side)]
        parts.append(np.asarray(embed(squares), dtype=np.float32))
    return region_pairs(np.concatenate(parts), np.repeat(rows, CORNERS), k=k, threshold=threshold, side=side)


def region_pairs(x: np.ndarray | None, owner: np.ndarray, *, k: int, threshold: float,
                 side: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs from corner-square descriptors ``x`` (one row per square, L2-normalised)
    whose images are ``owner``: see region_candidates."""
    from .knn import knn

    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if x is None or len(np.unique(owner)) < 2:
        return empty
    x = np.ascontiguousarray(x, dtype=np.float32)
    owner = np.asarray(owner, dtype=np.int64)
    # A square's nearest squares include its own image's other three (and itself): ask for those too.
    wanted = min(len(x), k + CORNERS)
    scores, ids = knn(x, x, wanted)
    other = (ids >= 0) & (owner[np.maximum(ids, 0)] != owner[:, None])
    rank = np.cumsum(other, axis=1)
    keep = other & (rank <= k) & (scores > threshold)
    a = np.repeat(owner, ids.shape[1]).reshape(ids.shape)[keep]
    b = owner[ids[keep]]
    s = scores[keep]
    if len(a) == 0:
        return empty
    pairs = merge_candidates((np.minimum(a, b), np.maximum(a, b), s))  # one entry per pair, its best cosine
    log.info("dedup: %d region candidate pairs from %d corner squares (side %.2f, k %d)", len(pairs[0]), len(x), side, k)
    return pairs


def merge_candidates(*sets: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of (src, dst, cosine) candidate sets (src < dst in each), keeping each pair's highest cosine."""
    src = np.concatenate([s[0] for s in sets]).astype(np.int64)
    dst = np.concatenate([s[1] for s in sets]).astype(np.int64)
    cos = np.concatenate([s[2] for s in sets]).astype(np.float32)
    if len(src) == 0:
        return src, dst, cos
    order = np.lexsort((-cos, dst, src))
    src, dst, cos = src[order], dst[order], cos[order]
    first = np.ones(len(src), bool)
    first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
    return src[first], dst[first], cos[first]
