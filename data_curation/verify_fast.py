"""Coarse-to-fine pixel verification: the alignment search of ``verify.align_exact``, 5-7x cheaper.

The exact search computes a full-resolution masked-NCC map for each of the 88 (scale, which image
is the crop, pose) combinations of a pair, with seven 128 x 128 FFTs per map. Almost all of them
are far from the best one. This path
1. ranks the 88 combinations at half resolution, where everything that depends on one image only
   (its spectra, the sums and energies of its pixels under every overlap window) is computed once
   per image and kept with it (an image is in many pairs): a pair costs one complex product and
   one small inverse FFT per combination, all in two batched calls;
2. computes the full-resolution masked-NCC map of only the ``coarse_candidates`` best-ranked
   combinations (batched in one call) and keeps the best of them as the exact search does (same
   order, same tie-breaking), its sidelobe from that map.
The full-resolution maps are the exact search's maps up to float rounding: the same formula, on
the shifts that can be valid, with a transform just large enough that those shifts do not wrap
around (96 instead of 128 at work_size 64). So whenever the exact search's best combination is
among those re-scored, the alignment is the exact one. Copies have one clearly best combination;
where the ranking misses (non-copies, whose combinations all score alike) the peak is the best
of the re-scored ones, at most a little below the exact maximum.
"""
from __future__ import annotations

import functools
import math

import torch

from .verify import Alignment, Prepared, VerifyParams, _resize, _sidelobe, _signed_shift, dihedral_stack

COARSE_FACTOR = 2  # the ranking runs at work_size / 2


def _fast_size(n: int) -> int:
    """Smallest even n' >= n whose only prime factors are 2, 3 and 5 (fast FFT sizes)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1 and n % 2 == 0:
            return n
        n += 1


def _overlap(size: int, side: int, shifts: torch.Tensor) -> torch.Tensor:
    """Overlap length on one axis of a ``side`` image at offset s over a ``size`` image."""
    return (torch.minimum(torch.full_like(shifts, size), shifts + side) - shifts.clamp(min=0)).clamp(min=0)


class _Level:
    """One resolution of the search: image size, crop sides, transform size and the kept shifts
    [low, high] (those where some crop side can overlap by ``min_overlap``), and constant tables."""

    def __init__(self, params: VerifyParams, size: int, fine_sides: list[int], *, radius: int = 0) -> None:
        self.size = size
        self.sides = fine_sides if size == params.work_size else [max(4, int(round(s * size / params.work_size))) for s in fine_sides]
        self.min_counts = [params.min_overlap * s * s for s in self.sides]
        # Enough overlap (count >= min_overlap x side^2) needs >= m = min_overlap x side px on each axis.
        ms = [max(1, math.floor(params.min_overlap * s)) for s in self.sides]
        self.low = min(m - s for m, s in zip(ms, self.sides))
        self.high = max(size - m for m in ms)
        no_wrap = max(size + s - m for m, s in zip(ms, self.sides))  # no alias lands on a shift that can be valid
        signed = 2 * max(self.high, -self.low) + 2  # shifts read back with their sign (_signed_shift)
        apart = (self.high - self.low) + 2 * radius + 2  # sidelobe distances not shortened by the wrap
        self.pad = _fast_size(max(no_wrap, signed, apart))
        self.width = self.high - self.low + 1
        p = self.pad
        k = torch.arange(p, dtype=torch.float64)
        # Multiplying a spectrum by this moves shift `low` to index 0: the kept shifts are [:width, :width].
        ramp_rows = torch.polar(torch.ones(p, dtype=torch.float64), 2 * math.pi * k * self.low / p)
        self.ramp = (ramp_rows[:, None] * ramp_rows[: p // 2 + 1][None, :]).to(torch.complex64)
        self.f_ones_big = self.spectrum(torch.ones((1, size, size)))
        self.g_ones_small = torch.stack([self.spectrum(torch.ones((1, s, s)))[0].conj() * self.ramp for s in self.sides])
        shifts = torch.arange(self.low, self.high + 1)
        self.counts = torch.stack([_overlap(size, s, shifts)[:, None] * _overlap(size, s, shifts)[None, :]
                                   for s in self.sides]).float()  # (sides, W, W), exact integers

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(x, s=(self.pad, self.pad))

    def small_spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """The small image's side of a correlation: conjugate spectrum, shift `low` moved to 0."""
        return self.spectrum(x).conj() * self.ramp

    def corr(self, f_big: torch.Tensor, g_small: torch.Tensor) -> torch.Tensor:
        """out[t] = sum_p big(p) small(p - low - t) for t in [0, width)^2 (broadcasting batches)."""
        return torch.fft.irfft2(f_big * g_small, s=(self.pad, self.pad))[..., : self.width, : self.width]


class _Stats:
    """An image's pixel statistics under every kept overlap window, in one role at one crop side.
    With inv = 1 / sqrt(variance) and mean_term = sum x inv / sqrt(count), a pair's masked NCC
    (verify._masked_ncc) is corr x inv_a x inv_b - mean_term_a x mean_term_b."""

    __slots__ = ("inv", "mean_term", "valid")

    def __init__(self, total: torch.Tensor, total2: torch.Tensor, count: torch.Tensor, min_count: float) -> None:
        n = count.clamp(min=1.0)
        var = (total2 - total * total / n).clamp(min=0.0)
        self.valid = (count >= min_count) & (var > 1e-6 * n)
        self.inv = torch.where(self.valid, var.clamp(min=1e-12).rsqrt(), torch.zeros_like(var))
        self.mean_term = total * self.inv / n.sqrt()  # 0 where invalid, as inv


def _ncc(corr: torch.Tensor, big: _Stats, small: _Stats) -> torch.Tensor:
    ncc = corr * big.inv * small.inv - big.mean_term * small.mean_term
    return torch.where(big.valid & small.valid, ncc, torch.full_like(ncc, -1.0))


class _Search:
    """Both levels for one set of parameters (built once: ``search``)."""

    def __init__(self, params: VerifyParams) -> None:
        size = params.work_size
        fine_sides = [max(8, int(round(scale * size))) for scale in params.scales]  # as verify.align_exact
        self.fine = _Level(params, size, fine_sides, radius=params.sidelobe_radius)
        self.coarse = _Level(params, size // COARSE_FACTOR, fine_sides)
        self.full = [s == size for s in fine_sides]  # same extent: B's poses over A only
        self.crops = [i for i, full in enumerate(self.full) if not full]


@functools.lru_cache(maxsize=8)
def search(params: VerifyParams) -> _Search:
    return _Search(params)


class CoarseImage:
    """One image's half-resolution data in both roles of a pair, at every crop side:
    as the big image (plain, or its 8 poses when the other image is shrunk into it) and as the
    small one (its poses, or its plain image, shrunk to the side)."""

    def __init__(self, prepared: Prepared, s: _Search) -> None:
        lv = s.coarse
        plain = _resize(prepared.plain(prepared.gray.shape[-1]), lv.size)  # (1, c, c): band-passed at full size, then shrunk
        poses = dihedral_stack(plain[0])  # (8, c, c)
        crops = s.crops
        g_ones = lv.g_ones_small

        def big_stats(f: torch.Tensor, f2: torch.Tensor, which: list[int]) -> _Stats:
            idx = torch.tensor(which)
            return _Stats(lv.corr(f[None], g_ones[idx, None]), lv.corr(f2[None], g_ones[idx, None]),
                          lv.counts[idx, None], torch.tensor([lv.min_counts[i] for i in which])[:, None, None, None])

        def small_side(x: torch.Tensor, which: list[int]) -> tuple[torch.Tensor, _Stats]:
            g = torch.stack([lv.small_spectrum(x if lv.sides[i] == lv.size else _resize(x, lv.sides[i])) for i in which])
            g2 = torch.stack([lv.small_spectrum((x if lv.sides[i] == lv.size else _resize(x, lv.sides[i])) ** 2) for i in which])
            idx = torch.tensor(which)
            stats = _Stats(lv.corr(lv.f_ones_big, g), lv.corr(lv.f_ones_big, g2), lv.counts[idx, None],
                           torch.tensor([lv.min_counts[i] for i in which])[:, None, None, None])
            return g, stats

        every = list(range(len(lv.sides)))
        self.f_plain = lv.spectrum(plain)  # (1, P, P')
        self.f_poses = lv.spectrum(poses)  # (8, P, P')
        self.big_plain = big_stats(self.f_plain, lv.spectrum(plain * plain), every)  # (sides, 1, W, W)
        self.big_poses = big_stats(self.f_poses, lv.spectrum(poses * poses), crops)  # (crops, 8, W, W)
        self.g_small_poses, self.small_poses = small_side(poses, every)  # (sides, 8, ...)
        self.g_small_plain, self.small_plain = small_side(plain, crops)  # (crops, 1, ...)


def coarse_image(prepared: Prepared) -> CoarseImage:
    """The image's half-resolution data, built on first use and kept with the prepared image
    (whose cache bounds how many are held)."""
    found = prepared.extras.get("coarse")
    if found is None:
        found = prepared.extras["coarse"] = CoarseImage(prepared, search(prepared.params))
    return found


def _ranking_peaks(corr: torch.Tensor, big: _Stats, small: _Stats) -> list:
    """Best NCC per map for ranking only: invalid shifts count as 0 instead of -1 (no mask pass;
    a combination whose every valid shift anti-correlates is never among the best anyway)."""
    return (corr * big.inv * small.inv - big.mean_term * small.mean_term).flatten(2).amax(2).tolist()


def coarse_ranking(a: CoarseImage, b: CoarseImage, s: _Search) -> list[tuple[float, int, str, int]]:
    """(half-resolution peak, scale index, crop_is, pose) of every combination of the pair, in the
    exact search's order: by scale; 'none' (scale 1) or 'b' (B is the crop) before 'a'; by pose."""
    lv = s.coarse
    # B's poses over A (B the crop, or the same extent): (sides, 8).
    peaks_b = _ranking_peaks(lv.corr(a.f_plain[None], b.g_small_poses), a.big_plain, b.small_poses)
    # A shrunk into each of B's poses: (crops, 8).
    peaks_a = _ranking_peaks(lv.corr(b.f_poses[None], a.g_small_plain), b.big_poses, a.small_plain) if s.crops else []
    out = []
    for i, full in enumerate(s.full):
        out += [(p, i, "none" if full else "b", d) for d, p in enumerate(peaks_b[i])]
        if not full:
            out += [(p, i, "a", d) for d, p in enumerate(peaks_a[s.crops.index(i)])]
    return out


FINE_ENTRIES_KEPT = 8  # full-resolution entries kept per image (~90 KB each); more are computed and dropped
# (a CoarseImage is ~2 MB: with verify_pairs' cache of prepared images, ~0.7 GB per process)


def _fine_entry(prepared: Prepared, role: str, d: int, i: int, s: _Search) -> tuple[torch.Tensor, _Stats]:
    """Full-resolution spectrum and overlap statistics of the image in one role of a combination:
    role 'big' = pose d (-1: the plain image) at full size under crop side i; role 'small' = pose
    d (-1: plain) shrunk to crop side i. Kept with the image up to FINE_ENTRIES_KEPT entries
    (computed the same way either way: results do not depend on what was kept)."""
    cache = prepared.extras.setdefault("fine", {})
    key = (role, d, i)
    if key in cache:
        return cache[key]
    lv = s.fine
    side = lv.size if role == "big" else lv.sides[i]
    # Pose d of the shrunk, band-passed image: flips and quarter turns commute with the (symmetric)
    # shrinking and band-pass, so one band-pass per side serves all 8 poses (the exact search
    # band-passes each pose: the same up to float rounding).
    x = prepared.plain(side) if d < 0 else dihedral_stack(prepared.plain(side)[0])[d : d + 1]
    if role == "big":
        f, g = lv.spectrum(x), lv.g_ones_small[i]
        entry = f, _Stats(lv.corr(f, g), lv.corr(lv.spectrum(x * x), g), lv.counts[i], lv.min_counts[i])
    else:
        g = lv.small_spectrum(x)
        entry = g, _Stats(lv.corr(lv.f_ones_big, g), lv.corr(lv.f_ones_big, lv.small_spectrum(x * x)), lv.counts[i],
                          lv.min_counts[i])
    if len(cache) < FINE_ENTRIES_KEPT:
        cache[key] = entry
    return entry


def align_coarse_to_fine(a: Prepared, b: Prepared, params: VerifyParams) -> Alignment:
    """verify.align_exact(a, b) restricted to the ``params.coarse_candidates`` combinations ranked
    best at half resolution (module docstring)."""
    s = search(params)
    ranking = coarse_ranking(coarse_image(a), coarse_image(b), s)
    # The best-ranked, visited in the exact search's order so that ties resolve as there.
    chosen = sorted(sorted(range(len(ranking)), key=lambda n: -ranking[n][0])[: max(1, params.coarse_candidates)])
    bigs, smalls = [], []
    for n in chosen:
        _, i, crop_is, d = ranking[n]
        if crop_is == "a":  # A shrunk into B's pose d
            bigs.append(_fine_entry(b, "big", d, i, s))
            smalls.append(_fine_entry(a, "small", -1, i, s))
        else:  # B's pose d (shrunk) over A
            bigs.append(_fine_entry(a, "big", -1, i, s))
            smalls.append(_fine_entry(b, "small", d, i, s))
    corr = s.fine.corr(torch.cat([f for f, _ in bigs]), torch.cat([g for g, _ in smalls]))
    maps = torch.stack([_ncc(c, big, small) for c, (_, big), (_, small) in zip(corr, bigs, smalls)])
    values, where = maps.flatten(1).max(dim=1)
    best = -2.0
    for j, value in enumerate(values.tolist()):
        if value > best:  # strictly better: the first in search order wins ties, as in align_exact
            best, pick = value, j
    if best <= -2.0:
        return Alignment(-1.0, -1.0, -1.0, 0, 1.0, "none", (0, 0), 0.0)
    _, i, crop_is, d = ranking[chosen[pick]]
    lv = s.fine
    ty, tx = divmod(int(where[pick]), lv.width)
    dy, dx = (ty + lv.low) % lv.pad, (tx + lv.low) % lv.pad  # index in a full circular map
    full_map = torch.full((lv.pad, lv.pad), -1.0)
    rows = torch.arange(lv.low, lv.high + 1) % lv.pad
    full_map[rows[:, None], rows[None, :]] = maps[pick]
    sidelobe = _sidelobe(full_map, dy, dx, params.sidelobe_radius)
    side = lv.sides[i]
    overlap = float(lv.counts[i, ty, tx]) / (side * side)
    return Alignment(best - params.background_weight * max(sidelobe, 0.0), best, sidelobe, d, params.scales[i], crop_is,
                     _signed_shift(dy, dx, lv.pad), overlap)
