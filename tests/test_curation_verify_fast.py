"""Coarse-to-fine verification against the exact search, on tiles of a shipped scene: planted copies
get the exact alignment, and the copy decisions of a set of pairs are the same."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2_repro.curation.background import score_pairs
from dinov2_repro.curation.config import ConfigError, load_curation_config
from dinov2_repro.curation.images import to_unit
from dinov2_repro.curation.verify import VerifyParams, params_from_config, verify_pairs

EXACT = VerifyParams(method="exact")
FAST = VerifyParams()  # the default: coarse_to_fine


@pytest.fixture(scope="module")
def pool() -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Tiles of a homogeneous texture (skimage grass), copies of some of them, and pairs: every
    copy with its source (planted) plus look-alike tile pairs that share no pixels."""
    from PIL import Image

    path = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data" / "grass.png"
    with Image.open(path) as image:
        scene = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    tile = lambda y, x: to_unit(scene[:, y : y + 64, x : x + 64])  # noqa: E731
    spots = [(y, x) for y in (0, 96, 192, 288) for x in (0, 96, 192, 288)]  # 32 px apart: no shared pixels
    images = [tile(y, x) for y, x in spots]
    rng = np.random.default_rng(0)
    base = images[:6]
    copies = [np.rot90(base[0], 1, axes=(1, 2)), base[1][:, :, ::-1], np.clip(base[2] + rng.normal(0, 0.05, base[2].shape), 0, 1),
              base[3][:, 8:56, 8:56], base[4][:, ::2, ::2], tile(spots[5][0], spots[5][1] + 16)]
    planted = [(i, len(images) + i) for i in range(len(copies))]
    images += [np.ascontiguousarray(c, dtype=np.float32) for c in copies]
    others = [(i, j) for i in range(16) for j in range(i + 1, 16) if (i * 7 + j) % 4 == 0]
    pairs = np.array(planted + others, dtype=np.int64)
    is_copy = np.array([True] * len(planted) + [False] * len(others))
    return images, pairs[:, 0], pairs[:, 1], is_copy


@pytest.fixture(scope="module")
def aligned(pool) -> dict:
    images, src, dst, _ = pool
    return {name: verify_pairs(src, dst, lambda i: images[i], p)[1] for name, p in (("exact", EXACT), ("fast", FAST))}


def _decisions(pool, alignments, threshold: float) -> np.ndarray:
    _, src, dst, _ = pool
    return score_pairs(src, dst, alignments, rank=2, weight=0.5) > threshold


def test_planted_copies_get_the_exact_alignment(pool, aligned):
    is_copy = pool[3]
    for exact, fast in zip(np.array(aligned["exact"], dtype=object)[is_copy], np.array(aligned["fast"], dtype=object)[is_copy]):
        assert (fast.dihedral, fast.scale, fast.crop_is, fast.shift) == (exact.dihedral, exact.scale, exact.crop_is, exact.shift)
        assert fast.peak == pytest.approx(exact.peak, abs=1e-4) and fast.sidelobe == pytest.approx(exact.sidelobe, abs=1e-4)
    # Never above the exact maximum: the fast search looks at a subset of the same maps.
    assert all(f.peak <= e.peak + 1e-4 for e, f in zip(aligned["exact"], aligned["fast"]))


def test_same_copy_decisions_as_the_exact_search(pool, aligned):
    reference = _decisions(pool, aligned["exact"], 0.5)
    assert reference[pool[3]].all() and not reference.all()  # both decisions occur: a real comparison
    np.testing.assert_array_equal(_decisions(pool, aligned["fast"], 0.5), reference)
    # The comparison can fail: a wrong threshold (or wrong scores) changes the decisions.
    assert (_decisions(pool, aligned["fast"], 0.9) != reference).any()


def test_one_candidate_is_still_a_valid_alignment(pool, aligned):
    """coarse_candidates=1 re-scores only the top-ranked combination: never better than exact."""
    images, src, dst, is_copy = pool
    _, few = verify_pairs(src[is_copy], dst[is_copy], lambda i: images[i], dataclasses.replace(FAST, coarse_candidates=1))
    exact = np.array(aligned["exact"], dtype=object)[is_copy]
    assert all(f.peak <= e.peak + 1e-4 and f.peak > 0.5 for e, f in zip(exact, few))


def test_method_is_a_checked_config_key():
    cfg = load_curation_config(None, ["dedup.verify.method=exact", "dedup.verify.coarse_candidates=2"])
    assert params_from_config(cfg.dedup.verify) == dataclasses.replace(VerifyParams(), method="exact", coarse_candidates=2)
    assert params_from_config(load_curation_config(None, []).dedup.verify).method == "coarse_to_fine"
    with pytest.raises(ConfigError, match="dedup.verify.method"):
        load_curation_config(None, ["dedup.verify.method=fast"])
    with pytest.raises(ConfigError, match="coarse_candidates"):
        load_curation_config(None, ["dedup.verify.coarse_candidates=0"])


def test_pose_statistics_by_symmetry_equal_the_direct_ones(pool):
    """The overlap statistics of an image's 8 poses are read from one computation per crop side
    (flipping an axis reverses the windows' shifts): each equals the statistics computed directly
    from the turned image, in both roles; a wrong pose does not."""
    from dinov2_repro.curation.verify import prepare
    from dinov2_repro.curation.verify_fast import _pose, search

    lv = search(FAST).fine
    prepared = prepare(pool[0][3], FAST)
    full = prepared.plain(lv.size)[0]
    smalls = torch.zeros((len(lv.sides), lv.size, lv.size))
    for i, side in enumerate(lv.sides):
        smalls[i, :side, :side] = prepared.plain(side)[0]
    ready = lv.pose_ready_stats(full, smalls)
    for i in (0, 2, len(lv.sides) - 1):
        side = lv.sides[i]
        shrunk = prepared.plain(side)[0]
        for d in range(8):
            padded = torch.zeros((1, 1, lv.size, lv.size))
            padded[0, 0, :side, :side] = _pose(shrunk, d)
            direct = {"big": lv.big_stats(_pose(full, d)[None], [i]), "small": lv.small_stats(padded, [i])}
            for role, st in direct.items():
                want = torch.stack([st.inv[0, 0], st.mean_term[0, 0], st.valid[0, 0].float()])
                got = lv.pose_stats(ready[role, i], d, i)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
                if d == 1:  # a quarter turn the other way round reads other windows
                    assert not torch.allclose(lv.pose_stats(ready[role, i], 3, i), want, rtol=1e-3, atol=1e-4)


def test_many_pairs_per_call_equal_one_pair_at_a_time(pool, aligned):
    """Pairs aligned in one batch (shared FFT calls) get what each gets alone."""
    from dinov2_repro.curation.verify import prepare
    from dinov2_repro.curation.verify_fast import align_batch, align_coarse_to_fine

    images, src, dst, _ = pool
    prepared = [prepare(im, FAST) for im in images]
    pairs = [(prepared[a], prepared[b]) for a, b in zip(src[:12], dst[:12])]
    together = align_batch(pairs, FAST)
    for (a, b), batch, listed in zip(pairs, together, aligned["fast"][:12]):
        alone = align_coarse_to_fine(a, b, FAST)
        for other in (batch, listed):  # listed: verify_pairs, in batches of its own
            assert (other.dihedral, other.scale, other.crop_is, other.shift) == (alone.dihedral, alone.scale, alone.crop_is, alone.shift)
            assert other.score == pytest.approx(alone.score, abs=1e-5)
