"""Pixel verification of candidate pairs and its self-calibration, on tiles of a shipped scene:
planted copies must align, distinct look-alike tiles of the same homogeneous scene must not."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dinov2_repro.curation.calibrate import COPY_KINDS, calibrate, choose_threshold, synthetic_pair
from dinov2_repro.curation.images import to_unit
from dinov2_repro.curation.verified_dedup import candidate_pairs
from dinov2_repro.curation.verify import VerifyParams, verify_images

PARAMS = VerifyParams(work_size=48, low_sigma=0.7, high_sigma=4.0)


@pytest.fixture(scope="module")
def grass() -> np.ndarray:
    """A homogeneous texture (skimage grass): its tiles look alike but are distinct."""
    from PIL import Image

    path = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data" / "grass.png"
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)


def _tile(scene: np.ndarray, y: int, x: int, size: int = 64) -> np.ndarray:
    return to_unit(scene[:, y : y + size, x : x + size])


def test_planted_copies_align_and_look_alikes_do_not(grass):
    base = _tile(grass, 64, 64)
    rng = np.random.default_rng(0)
    copies = {
        "rot90": np.rot90(base, 1, axes=(1, 2)), "hflip": base[:, :, ::-1],
        "noise": np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1),
        "half": base[:, ::2, ::2], "crop75": base[:, 8:56, 8:56],
        "shift25": _tile(grass, 64, 80), "colour": np.clip(base * 1.2 - 0.1, 0, 1) ** 0.8,
    }
    copy_scores = {k: verify_images(base, v, PARAMS) for k, v in copies.items()}
    others = [verify_images(base, _tile(grass, y, x), PARAMS).score for y, x in ((256, 256), (64, 192), (384, 64), (192, 320))]
    assert min(a.score for a in copy_scores.values()) > max(others) + 0.2, (copy_scores, others)
    assert copy_scores["rot90"].dihedral != 0 and copy_scores["hflip"].dihedral >= 4  # the flip/rotation is recovered
    assert copy_scores["crop75"].scale == 0.75 and copy_scores["crop75"].crop_is == "b"
    assert abs(copy_scores["shift25"].shift[1]) == 12  # 16 px of 64 at working size 48
    # Adjacent tile sharing no pixels, and an overlap below min_overlap: not copies.
    assert verify_images(base, _tile(grass, 64, 128), PARAMS).score < 0.6
    assert verify_images(base, _tile(grass, 64, 104), PARAMS).score < 0.6  # 24 of 64 px overlap < 50%


def test_calibration_separates_synthetic_copies_from_neighbours(grass):
    tiles = [_tile(grass, y, x) for y in range(0, 448, 128) for x in range(0, 448, 128)][:8]
    neighbours = np.array([(i, (i + 1) % len(tiles)) for i in range(len(tiles))])
    def embed(images):
        return np.stack([np.resize(im.mean(0), 16) / (np.linalg.norm(np.resize(im.mean(0), 16)) + 1e-9) for im in images])

    report = calibrate(tiles, neighbours, PARAMS, seed=0, embed=embed)
    assert report["positive_quantile_0.01"] > report["verify_threshold"] > report["negative_quantile_0.99"]
    assert report["verify_threshold"] >= report["threshold_floor"] == 1.0 - PARAMS.background_weight
    assert report["estimated_recall"] >= 0.95 and report["negative_fpr_upper_bound"] == 0.0
    assert set(report["estimated_recall_per_kind"]) == set(COPY_KINDS)
    # The candidate threshold is the cosine that keeps target_recall (0.99) of the calibration's
    # synthetic copies, and it carries over to copies of tiles calibration never saw (measured:
    # 60 of 63, 0.95; a median-cosine threshold would keep about half).
    assert report["candidate_threshold"] == pytest.approx(report["candidate_cosine_quantiles"]["0.01"], abs=2e-4)
    fresh = [_tile(grass, y, x) for y in range(64, 448, 128) for x in range(64, 448, 128)]
    rng = np.random.default_rng(5)
    pairs = [synthetic_pair(image, kind, rng) for image in fresh for kind in COPY_KINDS]
    cosines = np.einsum("ij,ij->i", embed([a for a, _ in pairs]), embed([b for _, b in pairs]))
    assert (cosines >= report["candidate_threshold"]).mean() >= 0.9, (report["candidate_threshold"], np.sort(cosines)[:5])


def test_threshold_choice_is_robust_to_copies_among_negatives():
    rng = np.random.default_rng(0)
    positives = rng.uniform(0.85, 1.0, 200)
    clean = rng.normal(0.55, 0.08, 180)
    contaminated = np.concatenate([clean, rng.uniform(0.9, 1.0, 20)])  # 10% real copies among the "negatives"
    a = choose_threshold(positives, clean, fp_weight=4)
    b = choose_threshold(positives, contaminated, fp_weight=4)
    assert clean.max() < a["threshold"] < 0.85 and clean.max() < b["threshold"] < 0.85, (a, b, clean.max())


def test_synthetic_pairs_and_candidate_selection():
    rng = np.random.default_rng(1)
    image = rng.random((3, 40, 40)).astype(np.float32)
    for kind in COPY_KINDS:
        a, b = synthetic_pair(image, kind, rng)
        assert a.ndim == b.ndim == 3 and b.shape[1] >= 8
    with pytest.raises(ValueError, match="unknown copy kind"):
        synthetic_pair(image, "blur", rng)
    # Row 0's neighbours: itself, 1 (0.9), 2 (0.8), 3 (0.5); k=2 keeps the first two real ones above 0.6.
    ids = np.array([[0, 1, 2, 3], [1, 0, 3, 2], [2, 0, 1, 3], [3, 1, 0, 2]])
    scores = np.array([[1, 0.9, 0.8, 0.5], [1, 0.9, 0.7, 0.1], [1, 0.8, 0.2, 0.1], [1, 0.7, 0.5, 0.1]])
    src, dst, cos = candidate_pairs(scores, ids, k=2, threshold=0.6)
    assert sorted(zip(src.tolist(), dst.tolist())) == [(0, 1), (0, 2), (1, 3)]


@pytest.mark.slow
def test_parallel_verification_matches_serial(tmp_path, grass):
    from dinov2_repro.curation.verified_dedup import verify_rows
    from PIL import Image

    rows = []
    for i, (y, x) in enumerate([(0, 0), (0, 64), (64, 0), (64, 64), (128, 0), (0, 16)]):
        Image.fromarray((_tile(grass, y, x).transpose(1, 2, 0) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png"})
    src, dst = np.array([0, 0, 1, 2, 3, 4, 0, 1]), np.array([5, 1, 2, 3, 4, 5, 2, 5])
    serial, _ = verify_rows(src, dst, rows, tmp_path, None, PARAMS, workers=1)
    parallel, _ = verify_rows(src, dst, rows, tmp_path, None, PARAMS, workers=2, chunk=2)
    np.testing.assert_allclose(parallel, serial, rtol=0, atol=1e-6)
    assert serial[0] > serial[1] + 0.2  # (0, 5) is a shifted window of 0; (0, 1) only its neighbour
