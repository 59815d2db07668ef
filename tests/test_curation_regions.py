"""Region candidates (data_curation/regions.py): a window shifted by a quarter of the tile shares a
corner square with the original, so the corner-square kNN proposes the pair even when the
whole-image descriptor would not; unrelated images stay out; the union keeps each pair once."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dinov2_repro.curation.regions import corner_squares, merge_candidates, region_candidates

TILE = 48


def _pixels_descriptor(images: list[np.ndarray]) -> np.ndarray:
    """A deterministic stand-in embedder: the image resized to 12x12, mean-removed, L2-normalised."""
    batch = torch.stack([F.interpolate(torch.from_numpy(np.ascontiguousarray(im))[None], size=(12, 12),
                                       mode="bilinear", antialias=True, align_corners=False)[0] for im in images])
    flat = batch.flatten(1)
    return F.normalize(flat - flat.mean(1, keepdim=True), dim=1).numpy()


def _scene_and_pool(seed: int = 0):
    rng = np.random.default_rng(seed)
    # Smooth random texture: distinct images decorrelate, shifted windows share pixels exactly.
    scene = torch.from_numpy(rng.random((1, 3, 400, 400), dtype=np.float32))
    scene = F.avg_pool2d(scene, 5, stride=1, padding=2)[0].numpy()
    windows = [(y, x) for y in range(0, 400 - TILE, 60) for x in range(0, 400 - TILE, 60)]
    pool = [scene[:, y : y + TILE, x : x + TILE] for y, x in windows]
    y, x = windows[7]
    shift = TILE // 4
    pool.append(scene[:, y : y + TILE, x + shift : x + shift + TILE])  # the copy of image 7, shifted by 25%
    y, x = windows[20]
    pool.append(scene[:, y + shift : y + shift + TILE, x : x + TILE])  # the copy of image 20, shifted down
    return pool


def test_corner_squares_of_a_shifted_window_match_pixel_for_pixel():
    image = np.arange(3 * 8 * 12, dtype=np.float32).reshape(3, 8, 12)
    squares = corner_squares(image, 0.75)
    assert [sq.shape for sq in squares] == [(3, 6, 6)] * 4
    np.testing.assert_array_equal(squares[3], image[:, 2:, 6:])  # bottom-right
    scene = np.random.default_rng(0).random((3, 40, 60), dtype=np.float32)
    original, shifted = scene[:, :, 0:40], scene[:, :, 10:50]  # shifted right by a quarter
    np.testing.assert_array_equal(corner_squares(original, 0.75)[1], corner_squares(shifted, 0.75)[0])


def test_region_candidates_propose_shifted_copies_and_not_unrelated_tiles():
    pool = _scene_and_pool()
    n = len(pool)
    src, dst, cos = region_candidates(lambda i: pool[i], range(n), _pixels_descriptor, side=0.75, k=2, threshold=0.9)
    pairs = set(zip(src.tolist(), dst.tolist()))
    assert (7, n - 2) in pairs and (20, n - 1) in pairs, pairs
    assert all(c > 0.99 for (a, b), c in zip(zip(src.tolist(), dst.tolist()), cos) if (a, b) in {(7, n - 2), (20, n - 1)})
    # The grid's windows are 60 px apart (> the 48 px tile): no two share pixels, none is proposed.
    assert pairs <= {(7, n - 2), (20, n - 1)}, pairs
    # The whole-image descriptor of a shifted copy is clearly further away than its shared square.
    whole = _pixels_descriptor([pool[7], pool[n - 2]])
    assert float(whole[0] @ whole[1]) < 0.9


def test_region_candidates_skip_rows_not_given_and_merge_keeps_the_best_cosine():
    pool = _scene_and_pool()
    n = len(pool)
    rows = [i for i in range(n) if i != 7]  # e.g. unreadable
    src, dst, _ = region_candidates(lambda i: pool[i], rows, _pixels_descriptor, side=0.75, k=2, threshold=0.9)
    assert 7 not in set(src.tolist()) | set(dst.tolist())
    merged = merge_candidates((np.array([1, 2]), np.array([5, 9]), np.array([0.5, 0.7], np.float32)),
                              (np.array([1, 3]), np.array([5, 4]), np.array([0.8, 0.6], np.float32)))
    assert list(zip(*[m.tolist() for m in merged[:2]])) == [(1, 5), (2, 9), (3, 4)]
    np.testing.assert_allclose(merged[2], [0.8, 0.7, 0.6])
