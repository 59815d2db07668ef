"""Score normalisation against background neighbours (data_curation/background.py) and the
copy range the self-calibration covers."""
from __future__ import annotations

import numpy as np

from dinov2_repro.curation.background import background_levels, neighbour_pairs, score_pairs
from dinov2_repro.curation.calibrate import CROP_SIDE_RANGE, SHIFT_RANGE, calibrate, synthetic_pair
from dinov2_repro.curation.verify import VerifyParams, align, prepare, single_thread

PARAMS = VerifyParams(work_size=48, low_sigma=0.7, high_sigma=4.0)


def test_background_level_is_the_rank_th_best_other_partner():
    # Image 0 pairs with 1 (0.9), 2 (0.5), 3 (0.4); image 1 also with 2 (0.3).
    src, dst, peaks = np.array([0, 0, 0, 1]), np.array([1, 2, 3, 2]), np.array([0.9, 0.5, 0.4, 0.3])
    first_src, first_dst = background_levels(src, dst, peaks, rank=1)
    np.testing.assert_allclose(first_src, [0.5, 0.9, 0.9, 0.9])  # the pair itself never counts
    np.testing.assert_allclose(first_dst, [0.3, 0.3, 0.0, 0.5])  # image 3 has no other partner: 0
    second_src, _ = background_levels(src, dst, peaks, rank=2)
    np.testing.assert_allclose(second_src, [0.4, 0.4, 0.5, 0.0])
    ids = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    assert [p.tolist() for p in neighbour_pairs(np.array([0, 2]), ids, 2)] == [[0, 0, 1], [1, 2, 2]]


def _star_field(rng: np.random.Generator, stars: int, size: int = 64) -> np.ndarray:
    """A dark sky with a few blurred stars: sparse, little structure to disagree on."""
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), 0.03, np.float32)
    for _ in range(stars):
        y, x = rng.uniform(4, size - 4, 2)
        radius, brightness = rng.uniform(0.8, 2.0), rng.uniform(0.4, 1.0)
        image += brightness * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * radius * radius))
    image = np.clip(image + rng.normal(0, 0.01, image.shape), 0, 1)
    return np.repeat(image[None], 3, 0).astype(np.float32)


def test_background_separates_a_sparse_copy_from_sparse_look_alikes():
    """Distinct star fields align almost as well as a copy (one star over another); the pair-only
    score cannot tell them apart, the background-normalised score ranks the copy first."""
    rng = np.random.default_rng(0)
    fields = [_star_field(rng, int(rng.integers(4, 8))) for _ in range(10)]
    copy = np.clip(fields[0] + rng.normal(0, 0.03, fields[0].shape), 0, 1).astype(np.float32)
    images = fields + [copy]
    pairs = np.array([(a, b) for a in range(len(images)) for b in range(a + 1, len(images))])
    with single_thread():
        prepared = [prepare(im, PARAMS) for im in images]
        alignments = [align(prepared[a], prepared[b], PARAMS) for a, b in pairs]
    raw = np.array([a.score for a in alignments])
    normalised = score_pairs(pairs[:, 0], pairs[:, 1], alignments, rank=2, weight=PARAMS.background_weight)
    is_copy = (pairs[:, 0] == 0) & (pairs[:, 1] == len(images) - 1)
    assert raw[~is_copy].max() >= raw[is_copy][0] - 0.01, raw  # pair-only: a look-alike as good as the copy
    assert normalised[is_copy][0] > normalised[~is_copy].max(), normalised
    # Calibrated on the same sparse pool (5 fields, their 4 nearest others as neighbours), the
    # threshold keeps the copy and rejects every look-alike.
    neighbours = np.array([(i, j) for i in range(5) for j in range(1, 10) if j != i][:: 2][:20])
    report = calibrate(fields[:5], neighbours, PARAMS, negative_images=fields, seed=0)
    assert report["verify_threshold"] >= 1.0 - PARAMS.background_weight
    assert normalised[~is_copy].max() < report["verify_threshold"] < normalised[is_copy][0], report["verify_threshold"]


def _window_origin(window: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left (y, x) of a window cut from the coordinate image of ``_coordinates``."""
    return int(round(window[0, 0, 0] * size)), int(round(window[1, 0, 0] * size))


def _coordinates(size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    return np.stack([yy, xx, np.zeros_like(yy)])


def test_calibration_copies_span_the_required_range():
    """Synthetic crops reach 75% of the side (and a little below), synthetic shifts 25% of the
    window: the calibrated thresholds are set on copies as hard as the required ones."""
    size, rng = 64, np.random.default_rng(0)
    image = _coordinates(size)
    sides, shifts = [], []
    for _ in range(200):
        _, crop = synthetic_pair(image, "crop", rng)
        sides.append(crop.shape[1] / size)
        first, second = synthetic_pair(image, "shift", rng)
        (y0, x0), (y1, x1) = _window_origin(first, size), _window_origin(second, size)
        shifts.append(max(abs(y1 - y0), abs(x1 - x0)) / first.shape[1])
        assert min(abs(y1 - y0), abs(x1 - x0)) <= 0.05 * first.shape[1]  # along one axis
    assert min(sides) <= 0.75 <= 0.9 <= max(sides) and min(sides) >= CROP_SIDE_RANGE[0] - 0.02
    assert max(shifts) >= 0.25 >= 0.12 >= min(shifts) and max(shifts) <= SHIFT_RANGE[1] + 0.02
