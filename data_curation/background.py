"""Score normalisation against background neighbours (as in SSCD's evaluation).

A raw alignment score is not comparable across images: sparse or smooth tiles (a black sky
with a few stars, a smooth retina, petals) align with many unrelated tiles almost as well as a
copy aligns with its source, because little structure is left to disagree; textured tiles align
with unrelated ones poorly. So each pair's peak correlation is compared to the best non-copy
evidence available for it:
- its own sidelobe: the best correlation of the same pose away from the peak (edges, ramps and
  periodic textures align almost as well at many shifts), and
- the background level of each of its two images: the ``rank``-th best peak the image reaches
  with its other nearest kNN neighbours (rank 2, not 1: an image with two copies still has one
  copy-free neighbour among its first two others).
Normalised score = peak - ``weight`` x max(sidelobe, background of either image, 0). A perfect
copy (peak ~1) keeps at least 1 - weight whatever its background, so groups of many copies of
one image still link.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .verify import Alignment


def neighbour_pairs(images: np.ndarray, ids: np.ndarray, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst), src < dst unique: every image in ``images`` with its first ``neighbours`` kNN neighbours."""
    images = np.unique(np.asarray(images, dtype=np.int64))
    if len(images) == 0 or neighbours <= 0:
        empty = np.zeros(0, np.int64)
        return empty, empty
    block = ids[images]
    rows = np.repeat(images, block.shape[1]).reshape(block.shape)
    valid = (block >= 0) & (block != rows)
    keep = valid & (np.cumsum(valid, axis=1) <= neighbours)
    a, b = rows[keep], block[keep].astype(np.int64)
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def background_levels(src: np.ndarray, dst: np.ndarray, peaks: np.ndarray, *, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """For every pair e = (src[e], dst[e]): the ``rank``-th best peak of src[e] with its other
    partners (pairs other than e), and the same for dst[e]; 0 where an image has fewer than
    ``rank`` other partners (no evidence: no correction)."""
    if rank < 1:
        raise ValueError(f"dedup.verify.background_rank must be >= 1, got {rank}")
    m = len(src)
    image = np.concatenate([src, dst]).astype(np.int64)
    value = np.concatenate([peaks, peaks]).astype(np.float64)
    order = np.lexsort((-value, image))
    image_s, value_s = image[order], value[order]
    starts = np.flatnonzero(np.r_[True, image_s[1:] != image_s[:-1]])
    group = np.cumsum(np.r_[False, image_s[1:] != image_s[:-1]])
    position = np.arange(len(image_s)) - starts[group]
    ends = np.r_[starts[1:], len(image_s)]

    def nth(n: int) -> np.ndarray:  # per group: the n-th best value (0-based), 0 when missing
        idx = starts + n
        return np.where(idx < ends, value_s[np.minimum(idx, len(value_s) - 1)], 0.0)

    # If the pair itself is among its image's top ``rank``, the rank-th best of the others is one further down.
    level_sorted = np.where(position < rank, nth(rank)[group], nth(rank - 1)[group])
    level = np.empty_like(level_sorted)
    level[order] = level_sorted
    return level[:m], level[m:]


def image_background_levels(pairs: np.ndarray, peaks: np.ndarray, num_images: int, *, rank: int) -> np.ndarray:
    """Per image i < ``num_images``: the ``rank``-th best peak over all its pairs in ``pairs`` (E, 2)
    (0 if fewer). No pair is excluded: calibration scores a synthetic copy, which is not among
    them, against its source image's background."""
    levels = np.zeros(num_images)
    for i in range(num_images):
        mine = np.sort(peaks[(pairs[:, 0] == i) | (pairs[:, 1] == i)])[::-1]
        levels[i] = mine[rank - 1] if len(mine) >= rank else 0.0
    return levels


def normalised_scores(peaks: np.ndarray, sidelobes: np.ndarray, background: np.ndarray, *, weight: float) -> np.ndarray:
    """peak - weight x max(sidelobe, background, 0)."""
    reference = np.maximum(np.maximum(np.asarray(sidelobes, np.float64), np.asarray(background, np.float64)), 0.0)
    return np.asarray(peaks, np.float64) - weight * reference


def score_pairs(src: np.ndarray, dst: np.ndarray, alignments: list[Alignment], *, rank: int, weight: float) -> np.ndarray:
    """Normalised score of every aligned pair, the background taken from the same set of pairs."""
    peaks = np.array([a.peak for a in alignments], np.float64)
    sidelobes = np.array([a.sidelobe for a in alignments], np.float64)
    if len(peaks) == 0:
        return peaks
    bg_src, bg_dst = background_levels(src, dst, peaks, rank=rank)
    return normalised_scores(peaks, sidelobes, np.maximum(bg_src, bg_dst), weight=weight)


def align_with_background(cand_src: np.ndarray, cand_dst: np.ndarray, ids: np.ndarray, neighbours: int,
                          align_pairs: Callable[[np.ndarray, np.ndarray], list[Alignment]]) -> tuple[np.ndarray, np.ndarray, list[Alignment]]:
    """Align the candidate pairs together with the background pairs of their images (each image
    with its first ``neighbours`` kNN neighbours). Returns (src, dst, alignments) of all aligned
    pairs, candidates included (src < dst, unique)."""
    involved = np.concatenate([cand_src, cand_dst])
    bsrc, bdst = neighbour_pairs(involved, ids, neighbours)
    pairs = np.unique(np.concatenate([np.stack([cand_src, cand_dst], 1), np.stack([bsrc, bdst], 1)]).astype(np.int64), axis=0)
    if len(pairs) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, []
    return pairs[:, 0], pairs[:, 1], align_pairs(pairs[:, 0], pairs[:, 1])
