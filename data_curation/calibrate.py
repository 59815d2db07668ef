"""Self-calibration of the dedup thresholds on the pool itself (no hand-tuned threshold).

Positives: synthetic copies of sampled pool images, one per copy kind (JPEG, downscaling,
colour/contrast, flips/rotations, noise, crops, shifted windows). Negatives: each sampled image
against its nearest kNN neighbours -- the hardest non-copies the pool has to offer.

Two thresholds come out:
- ``verify_threshold`` on the normalised alignment score (verify.py, background.py): the one maximising
  recall - ``fp_weight`` x false-positive rate (a false removal costs more than a missed copy),
  never below 1 - ``background_weight`` (see the floor in ``_calibrate``).
  The pool may hold real copies, so some "negatives" are in fact positives: neighbour pairs
  aligning better than the median synthetic copy are set aside as likely copies;
- ``candidate_threshold`` on the embedding cosine: low enough that the kNN stage proposes
  ``target_recall`` of the synthetic copies to verification.
The report gives the estimated recall per copy kind and the false-positive rate on the negatives
(an upper bound: real copies among the neighbours count as false positives).
"""
from __future__ import annotations

import io
from typing import Callable, Sequence

import numpy as np

from .background import background_levels, image_background_levels, normalised_scores
from .verify import VerifyParams, align, prepare, single_thread

COPY_KINDS = ("jpeg", "downscale", "colour", "dihedral", "noise", "crop", "shift")
# Synthetic crops keep this fraction of the side; synthetic shifts move a window by this
# fraction of its side. They span (and slightly exceed) the required copies: crops >= 75%, shifts <= 25%.
CROP_SIDE_RANGE = (0.72, 0.95)
SHIFT_RANGE = (0.1, 0.27)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, C) uint8."""
    return (np.ascontiguousarray(image.transpose(1, 2, 0)) * 255).round().clip(0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) float -> (C, height, width), antialiased."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    return F.interpolate(t, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0].numpy()


def colour_change(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, gamma and saturation jitter."""
    brightness, contrast, saturation = rng.uniform(0.75, 1.25, size=3)
    gamma = rng.uniform(0.7, 1.4)
    out = np.clip(image * brightness, 0, 1) ** gamma
    out = (out - out.mean()) * contrast + out.mean()
    gray = out.mean(axis=0, keepdims=True)
    return np.clip((out - gray) * saturation + gray, 0, 1).astype(np.float32)


def dihedral(image: np.ndarray, index: int) -> np.ndarray:
    """index 0-3: rotations by index x 90 degrees; 4-7: the same after a horizontal flip."""
    base = image[:, :, ::-1] if index >= 4 else image
    return np.ascontiguousarray(np.rot90(base, index % 4, axes=(1, 2)))


def synthetic_pair(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(original, copy) made from one pool image (C, H, W) in [0, 1]. For ``shift`` both are
    windows of the image (75% of its side) offset along one axis (SHIFT_RANGE of the window)."""
    _, h, w = image.shape
    if kind == "jpeg":
        return image, _jpeg(image, int(rng.integers(30, 70)))
    if kind == "downscale":
        f = rng.uniform(0.5, 0.8)
        return image, resize_image(image, max(8, int(h * f)), max(8, int(w * f)))
    if kind == "colour":
        return image, colour_change(image, rng)
    if kind == "dihedral":
        return image, dihedral(image, int(rng.integers(1, 8)))
    if kind == "noise":
        return image, np.clip(image + rng.normal(0, rng.uniform(0.02, 0.06), image.shape), 0, 1).astype(np.float32)
    if kind == "crop":
        # Down to (a little below) the smallest required crop, 75% of the side, so the calibrated
        # candidate cosine lets the hardest required crops through.
        side = rng.uniform(CROP_SIDE_RANGE[0], CROP_SIDE_RANGE[1])
        ch, cw = max(8, int(round(h * side))), max(8, int(round(w * side)))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return image, image[:, top : top + ch, left : left + cw]
    if kind == "shift":
        # Two windows of 75% of the image side, offset along one axis by up to SHIFT_RANGE[1] of
        # the window (the required shifted windows: <= 25% of the tile), plus a small jitter.
        ch, cw = max(8, int(round(h * 0.75))), max(8, int(round(w * 0.75)))
        along = int(rng.integers(0, 2))
        offsets = [int(round(rng.uniform(*SHIFT_RANGE) * s)) for s in (ch, cw)]
        offsets[1 - along] = int(rng.integers(0, max(1, int(0.05 * (ch, cw)[1 - along])) + 1))
        dy, dx = min(offsets[0], h - ch), min(offsets[1], w - cw)
        return image[:, :ch, :cw], image[:, dy : dy + ch, dx : dx + cw]
    raise ValueError(f"unknown copy kind {kind!r} (kinds: {', '.join(COPY_KINDS)})")


def choose_threshold(positives: np.ndarray, negatives: np.ndarray, *, fp_weight: float) -> dict:
    """The threshold maximising recall(t) - fp_weight x false-positive rate(t) (the middle of the
    best plateau). Real copies among the negatives add about the same false positives at every
    threshold below the positives, so they barely move the choice."""
    grid = np.unique(np.concatenate([positives, negatives]))
    grid = np.concatenate([[grid[0] - 1e-6], grid])
    recall = (positives[None, :] > grid[:, None]).mean(1)
    fpr = (negatives[None, :] > grid[:, None]).mean(1)
    gain = recall - fp_weight * fpr
    best = np.flatnonzero(gain >= gain.max() - 1e-9)
    # Middle of the plateau: halfway between its lowest threshold and the next score above its highest.
    low, high_index = grid[best[0]], best[-1] + 1
    high = grid[high_index] if high_index < len(grid) else grid[best[-1]]
    threshold = 0.5 * (low + high)
    return {"threshold": round(float(threshold), 4), "gain": round(float(gain.max()), 4),
            "positive_quantile_0.01": round(float(np.quantile(positives, 0.01)), 4),
            "negative_quantile_0.99": round(float(np.quantile(negatives, 0.99)), 4)}


def calibrate(images: Sequence[np.ndarray], neighbour_pairs: np.ndarray, params: VerifyParams, *,
              embed: Callable[[list[np.ndarray]], np.ndarray] | None = None, target_recall: float = 0.99,
              fp_weight: float = 10.0, seed: int = 0, negative_images: Sequence[np.ndarray] | None = None,
              background_rank: int = 2) -> dict:
    """Thresholds + estimated precision/recall from ``images`` (sampled pool images, (C, H, W) in
    [0, 1]) and ``neighbour_pairs`` (E, 2) indices into ``images`` of nearest non-identical
    neighbours (indices into ``negative_images`` when given, which then starts with ``images``).
    Scores are normalised as in the pipeline (background.py): each sampled image's neighbours
    are its background, and its synthetic copies are compared against that background too.
    ``embed`` (list of images -> L2-normalised descriptors) calibrates the candidate
    cosine threshold; without it only the verification threshold is calibrated."""
    with single_thread():
        return _calibrate(images, neighbour_pairs, params, embed=embed, target_recall=target_recall,
                          fp_weight=fp_weight, seed=seed, negative_images=negative_images, background_rank=background_rank)


def _calibrate(images: Sequence[np.ndarray], neighbour_pairs: np.ndarray, params: VerifyParams, *,
               embed: Callable[[list[np.ndarray]], np.ndarray] | None, target_recall: float, fp_weight: float,
               seed: int, negative_images: Sequence[np.ndarray] | None, background_rank: int) -> dict:
    rng = np.random.default_rng(seed)
    prepared = [prepare(im, params) for im in (images if negative_images is None else negative_images)]
    kinds, positives, owners, pairs = [], [], [], []
    for i, image in enumerate(images):
        for kind in COPY_KINDS:
            original, copy = synthetic_pair(image, kind, rng)
            positives.append(align(prepare(original, params), prepare(copy, params), params))
            kinds.append(kind)
            owners.append(i)
            pairs.append((original, copy))
    neighbour_pairs = np.asarray(neighbour_pairs, dtype=np.int64).reshape(-1, 2)
    if len(neighbour_pairs) == 0:
        raise ValueError("calibration: no neighbour pairs to estimate the non-copy scores from (pool too small?)")
    negatives = [align(prepared[a], prepared[b], params) for a, b in neighbour_pairs]
    neg_peaks = np.array([a.peak for a in negatives])
    bg_a, bg_b = background_levels(neighbour_pairs[:, 0], neighbour_pairs[:, 1], neg_peaks, rank=background_rank)
    neg_scores = normalised_scores(neg_peaks, [a.sidelobe for a in negatives], np.maximum(bg_a, bg_b),
                                   weight=params.background_weight)
    # A sampled image's background: the rank-th best peak with its neighbours (none of them excluded:
    # its synthetic copy is not among them). The copy shows the same content, so the same level applies.
    own_level = image_background_levels(neighbour_pairs, neg_peaks, len(images), rank=background_rank)
    pos = normalised_scores([a.peak for a in positives], [a.sidelobe for a in positives], own_level[np.array(owners)],
                            weight=params.background_weight)
    # A neighbour pair aligning better than the median synthetic copy is, on this evidence, more
    # likely one of the pool's own copies than a look-alike: it is set aside, not counted as a
    # false positive (with a good embedder a copied image's nearest neighbour is its copy).
    likely_copy = neg_scores > np.median(pos)
    all_neg_scores, neg_scores = neg_scores, neg_scores[~likely_copy]
    if len(neg_scores) == 0:
        raise ValueError("calibration: every neighbour pair aligns like a copy; the pool is mostly duplicates")
    chosen = choose_threshold(pos, neg_scores, fp_weight=fp_weight)
    # Floor: a look-alike whose peak is matched by its background (or sidelobe) scores at most
    # peak x (1 - weight) <= 1 - weight (background.py); such pairs pile up just below it (a few
    # calibration negatives cannot show how many there are), so the threshold never goes under it.
    floor = 1.0 - params.background_weight
    t = max(chosen["threshold"], floor)
    kinds_arr = np.array(kinds)
    per_kind = {k: round(float((pos[kinds_arr == k] > t).mean()), 4) for k in COPY_KINDS}
    recall = float((pos > t).mean())
    fpr = float((neg_scores > t).mean())
    # Precision if copies and neighbour pairs were as frequent as in this calibration set.
    tp, fp = recall * len(pos), fpr * len(neg_scores)
    report = {"verify_threshold": t, "threshold_before_floor": chosen["threshold"], "threshold_floor": round(floor, 4),
              **{k: v for k, v in chosen.items() if k != "threshold"},
              "estimated_recall": round(recall, 4), "estimated_recall_per_kind": per_kind,
              "negative_fpr_upper_bound": round(fpr, 4),
              "estimated_precision": round(tp / max(tp + fp, 1e-9), 4),
              "images": len(images), "positives": len(pos), "negatives": len(neg_scores), "target_recall": target_recall,
              "positive_scores": np.round(pos, 4).tolist(), "positive_kinds": kinds,
              "negatives_set_aside_as_likely_copies": int(likely_copy.sum()),
              "negative_scores": np.round(all_neg_scores, 4).tolist()}
    if embed is not None:
        first = embed([p[0] for p in pairs])
        second = embed([p[1] for p in pairs])
        cosines = np.einsum("ij,ij->i", first, second)
        report["candidate_threshold"] = round(float(np.quantile(cosines, 1.0 - target_recall)) - 1e-4, 4)
        report["candidate_cosine_quantiles"] = {q: round(float(np.quantile(cosines, float(q))), 4) for q in ("0.01", "0.05", "0.5")}
    return report

