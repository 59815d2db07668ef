"""Coarse-to-fine pixel verification: the alignment search of ``verify.align_exact``, ~10x cheaper.

The exact search computes a full-resolution masked-NCC map for each of the 88 (scale, which image
is the crop, pose) combinations of a pair, with seven 128 x 128 FFTs per map. Almost all of them
are far from the best one. This path
1. ranks the 88 combinations at low resolution (26 px for work_size 64: 40 x 40 transforms),
   where everything that depends on one image only (its spectra, the sums and energies of its
   pixels under every overlap window) is computed once per image and kept with it (an image is in
   many pairs): a pair costs one complex product and one small inverse FFT per combination;
2. computes the full-resolution masked-NCC map of only the ``coarse_candidates`` best-ranked
   combinations and keeps the best of them as the exact search does (same order, same
   tie-breaking), its sidelobe from that map.
Many pairs share each FFT call (``align_batch``; verify_pairs passes batches). The overlap sums
come from cumulative sums read through slices, not from FFTs, and the statistics of an image's 8
poses from one computation per crop side (``_Level.pose_ready_stats``): flipping an image
reverses the shifts of its overlap windows.
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
import torch.nn.functional as F

from .verify import Alignment, Prepared, VerifyParams, _resize, _signed_shift, dihedral_stack

COARSE_FACTOR = 64 / 26  # the ranking runs at 26 px for work_size 64: its transforms are 40 x 40 instead of 48 x 48


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
        self.min_count_table = torch.tensor(self.min_counts)[:, None, None, None]
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

    def big_stats(self, x: torch.Tensor, which: list[int]) -> _Stats:
        """Overlap statistics of big images x (N, size, size) under each crop side in ``which``:
        (len(which), N, W, W). The big image's pixels under a crop side s placed at shift t are
        [t, t + s) clipped to the image, on each axis."""
        return self._stats(*_window_sums(x, [self.sides[i] for i in which], self.low, self.width), which)

    def small_stats(self, x: torch.Tensor, which: list[int]) -> _Stats:
        """Overlap statistics of small images x (K, N, size, size), image k shrunk to crop side
        which[k] and zero-padded to size (shrink_padded): (K, N, W, W). The small image's pixels
        over the big one at shift t are [-t, size - t) clipped (its zero padding adds nothing);
        turned by 180 degrees they are [t, t + size) clipped: the big image's windows."""
        total, total2 = _window_sums(x.flip(-2, -1), [self.size], self.low, self.width)
        return self._stats(total[0], total2[0], which)

    def pose_ready_stats(self, full: torch.Tensor, smalls: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
        """(role, crop side index) -> (3, E, E): inv, mean_term and valid (0/1) of one image in
        one role ('big': ``full``, (size, size); 'small': smalls[i], the image shrunk to crop side
        i and zero-padded to size) under that crop side, over shifts [elow, ehigh] symmetric about
        (size - side) / 2 and covering the kept ones. Flipping an axis of an image maps its window
        at t to the window at size - side - t: on this range, a reversal of the array. So the
        statistics of pose d of the image are pose d of this array (``pose_stats``): one
        computation serves all 8 poses (and one call all sides, over the union of the ranges)."""
        ranges = [self._symmetric_range(i) for i in range(len(self.sides))]
        low = min(lo for lo, _ in ranges)
        width = max(lo + w for lo, w in ranges) - low
        count, min_count = self._union_counts(low, width)
        big = _Stats(*_window_sums(full, self.sides, low, width), count, min_count)
        total, total2 = _window_sums(smalls.flip(-2, -1), [self.size], low, width)
        small = _Stats(total[0], total2[0], count, min_count)
        out = {}
        for role, st in (("big", big), ("small", small)):
            ready = torch.stack([st.inv, st.mean_term, st.valid.float()])  # (3, sides, E, E)
            for i, (lo, w) in enumerate(ranges):
                out[role, i] = ready[:, i, lo - low : lo - low + w, lo - low : lo - low + w]
        return out

    def _symmetric_range(self, i: int) -> tuple[int, int]:
        """(elow, width) of pose_ready_stats' shift range for crop side i."""
        elow = min(self.low, self.size - self.sides[i] - self.high)
        return elow, self.size - self.sides[i] - 2 * elow + 1

    @functools.lru_cache(maxsize=8)
    def _union_counts(self, low: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        shifts = torch.arange(low, low + width)
        counts = torch.stack([_overlap(self.size, side, shifts)[:, None] * _overlap(self.size, side, shifts)[None, :]
                              for side in self.sides]).float()
        return counts, self.min_count_table[:, 0]

    def pose_stats(self, ready: torch.Tensor, d: int, i: int) -> torch.Tensor:
        """(3, W, W): pose_ready_stats (crop side i) of an image turned into pose d, on the kept shifts."""
        start = self.low - self._symmetric_range(i)[0]
        return _pose(ready, d)[:, start : start + self.width, start : start + self.width]

    def shrink_padded(self, x: torch.Tensor, which: list[int]) -> torch.Tensor:
        """x (N, size, size) shrunk to each crop side in ``which`` and zero-padded back to size:
        (len(which), N, size, size), the small images of small_stats and small_spectrum."""
        out = x.new_zeros((len(which),) + tuple(x.shape))
        for k, i in enumerate(which):
            side = self.sides[i]
            out[k, ..., :side, :side] = x if side == self.size else _resize(x, side)
        return out

    def _stats(self, total: torch.Tensor, total2: torch.Tensor, which: list[int]) -> _Stats:
        idx = torch.tensor(which)
        return _Stats(total, total2, self.counts[idx, None], self.min_count_table[idx])

    def corr(self, f_big: torch.Tensor, g_small: torch.Tensor) -> torch.Tensor:
        """out[t] = sum_p big(p) small(p - low - t) for t in [0, width)^2 (broadcasting batches)."""
        return torch.fft.irfft2(f_big * g_small, s=(self.pad, self.pad))[..., : self.width, : self.width]


def _pose(x: torch.Tensor, d: int) -> torch.Tensor:
    """Pose d of (..., H, W) in verify.dihedral_stack's order: 4 quarter turns, then 4 of the flip."""
    return torch.rot90(x if d < 4 else x.flip(-1), d % 4, dims=(-2, -1))


def _window_sums(x: torch.Tensor, sides: list[int], low: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of x and of x squared (..., size, size) over the windows [t, t + side) x [u, u + side)
    clipped to the image, for t, u in [low, low + width) and each side: (len(sides), ..., width,
    width) each. By cumulative sums read through slices (four look-ups per window instead of two
    correlations by FFT); the sides share the cumulative sums."""
    size = x.shape[-1]
    left, right = max(0, -low), max(0, low + width - 1 + max(sides) - size)
    lo = left + low  # where the slice of [t] starts; [t + side] starts at lo + side
    rows = _extended_cumsum(torch.stack([x, x * x]), -2, left, right)
    rows = torch.stack([rows.narrow(-2, lo + side, width) for side in sides]) - rows.narrow(-2, lo, width)
    cols = _extended_cumsum(rows, -1, left, right)
    sums = torch.stack([c.narrow(-1, lo + side, width) for c, side in zip(cols, sides)]) - cols.narrow(-1, lo, width)
    return sums[:, 0], sums[:, 1]


def _extended_cumsum(x: torch.Tensor, dim: int, left: int, right: int) -> torch.Tensor:
    """Cumulative sums of x along ``dim`` (length n), read at clamp(j - left, 0, n) for every index j:
    ``left`` + 1 zeros, the n running sums, then ``right`` copies of the total."""
    c = x.cumsum(dim)
    n = c.shape[dim]
    zeros = torch.zeros_like(c.narrow(dim, 0, 1)).expand(*[left + 1 if d == dim % c.ndim else -1 for d in range(c.ndim)])
    total = c.narrow(dim, n - 1, 1).expand(*[right if d == dim % c.ndim else -1 for d in range(c.ndim)])
    return torch.cat([zeros, c, total], dim)


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
        self.coarse = _Level(params, int(round(size / COARSE_FACTOR)), fine_sides)
        self.full = [s == size for s in fine_sides]  # same extent: B's poses over A only
        self.crops = [i for i, full in enumerate(self.full) if not full]
        # The ranking's columns: B's poses over A, (sides, 8), then A into B's poses, (crops, 8);
        # `order` puts them in the exact search's order: by scale; 'none' (scale 1) or 'b' (B is the
        # crop) before 'a'; by pose. meta: (scale index, crop_is, pose) of each.
        n_b = 8 * len(fine_sides)
        self.order, self.meta = [], []
        for i, full in enumerate(self.full):
            self.order += [8 * i + d for d in range(8)]
            self.meta += [(i, "none" if full else "b", d) for d in range(8)]
            if not full:
                self.order += [n_b + 8 * self.crops.index(i) + d for d in range(8)]
                self.meta += [(i, "a", d) for d in range(8)]
        self.combinations = len(self.order)


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
        crops, every = s.crops, list(range(len(lv.sides)))
        self.f_plain = lv.spectrum(plain)  # (1, P, P')
        self.f_poses = lv.spectrum(poses)  # (8, P, P')
        self.big_plain = lv.big_stats(plain, every)  # (sides, 1, W, W)
        self.big_poses = lv.big_stats(poses, crops)  # (crops, 8, W, W)
        small_poses, small_plain = lv.shrink_padded(poses, every), lv.shrink_padded(plain, crops)
        self.g_small_poses, self.small_poses = lv.small_spectrum(small_poses), lv.small_stats(small_poses, every)  # (sides, 8, ...)
        self.g_small_plain, self.small_plain = lv.small_spectrum(small_plain), lv.small_stats(small_plain, crops)  # (crops, 1, ...)


def coarse_image(prepared: Prepared) -> CoarseImage:
    """The image's half-resolution data, built on first use and kept with the prepared image
    (whose cache bounds how many are held)."""
    found = prepared.extras.get("coarse")
    if found is None:
        found = prepared.extras["coarse"] = CoarseImage(prepared, search(prepared.params))
    return found


def _big_spectrum(prepared: Prepared, d: int, lv: _Level) -> torch.Tensor:
    """Full-resolution spectrum of the image's pose d as the big image (P, P'), kept with the
    prepared image (at most 8). Flips and quarter turns commute with the (symmetric) shrinking and
    band-pass, so the poses of one band-passed image serve (the exact search band-passes each pose:
    the same up to float rounding)."""
    cache = prepared.extras.setdefault("fine_spectra", {})
    if d not in cache:
        cache[d] = lv.spectrum(_pose(prepared.plain(lv.size)[0], d))
    return cache[d]


def _ready(prepared: Prepared, role: str, i: int, lv: _Level) -> torch.Tensor:
    """_Level.pose_ready_stats of the image at full resolution, kept with the prepared image."""
    cache = prepared.extras.get("fine_stats")
    if cache is None:
        smalls = torch.zeros((len(lv.sides), lv.size, lv.size))
        for k, side in enumerate(lv.sides):
            smalls[k, :side, :side] = prepared.plain(side)[0]
        cache = prepared.extras["fine_stats"] = lv.pose_ready_stats(prepared.plain(lv.size)[0], smalls)
    return cache[role, i]


def _ranking(pairs: list[tuple[Prepared, Prepared]], s: _Search) -> torch.Tensor:
    """Half-resolution peak NCC of every combination of each pair: (pairs, combinations) in the
    exact search's order (_Search.order). Invalid shifts count as 0 instead of -1 (ranking only:
    a combination whose every valid shift anti-correlates is never among the best anyway)."""
    lv, n = s.coarse, len(pairs)
    images = [(coarse_image(a), coarse_image(b)) for a, b in pairs]
    first = images[0][0]
    # B's poses over A (B the crop, or the same extent): (sides, 8) maps per pair ...
    prod_b = first.f_plain.new_empty((n,) + tuple(first.g_small_poses.shape))
    # ... and A shrunk into each of B's poses: (crops, 8).
    prod_a = first.f_plain.new_empty((n, len(s.crops)) + tuple(first.f_poses.shape))
    for k, (a, b) in enumerate(images):
        torch.mul(a.f_plain, b.g_small_poses, out=prod_b[k])
        torch.mul(b.f_poses, a.g_small_plain, out=prod_a[k])
    shape = (lv.pad, lv.pad)
    corr_b = torch.fft.irfft2(prod_b, s=shape)[..., : lv.width, : lv.width]
    corr_a = torch.fft.irfft2(prod_a, s=shape)[..., : lv.width, : lv.width]
    peaks = corr_b.new_empty((n, s.combinations))
    nb = corr_b.shape[1] * corr_b.shape[2]
    for k, (a, b) in enumerate(images):
        for corr, big, small, out in ((corr_b[k], a.big_plain, b.small_poses, peaks[k, :nb]),
                                      (corr_a[k], b.big_poses, a.small_plain, peaks[k, nb:])):
            ncc = (corr * big.inv).mul_(small.inv).sub_(big.mean_term * small.mean_term)
            torch.amax(ncc.flatten(2), 2, out=out.view(ncc.shape[:2]))
    return peaks[:, s.order]


def align_batch(pairs: list[tuple[Prepared, Prepared]], params: VerifyParams) -> list[Alignment]:
    """verify.align_exact(a, b) of each pair, restricted to the ``params.coarse_candidates``
    combinations ranked best at low resolution (module docstring); many pairs per FFT call."""
    if not pairs:
        return []
    s, lv = search(params), search(params).fine
    n, k = len(pairs), min(max(1, params.coarse_candidates), s.combinations)
    # The best-ranked of each pair, visited in the exact search's order so that ties resolve as there.
    chosen = torch.argsort(-_ranking(pairs, s), dim=1, stable=True)[:, :k].sort(dim=1).values.tolist()
    combos = [[s.meta[c] for c in row] for row in chosen]  # (scale index, crop_is, pose)
    f_bigs, big_stats, small_stats = [], [], []
    smalls = torch.zeros((n * k, lv.size, lv.size))  # zero-padded
    for p, (a, b) in enumerate(pairs):
        for j, (i, crop_is, d) in enumerate(combos[p]):
            side = lv.sides[i]
            if crop_is == "a":  # A shrunk into B's pose d
                big, big_pose, small, small_pose = b, d, a, 0
            else:  # B's pose d (shrunk) over A
                big, big_pose, small, small_pose = a, 0, b, d
            f_bigs.append(_big_spectrum(big, big_pose, lv))
            smalls[p * k + j, :side, :side] = _pose(small.plain(side)[0], small_pose)
            big_stats.append(lv.pose_stats(_ready(big, "big", i, lv), big_pose, i))
            small_stats.append(lv.pose_stats(_ready(small, "small", i, lv), small_pose, i))
    corr = lv.corr(torch.stack(f_bigs), lv.small_spectrum(smalls))
    big, small = torch.stack(big_stats, 1), torch.stack(small_stats, 1)  # (inv, mean_term, valid) x (n k, W, W)
    ncc = (corr * big[0]).mul_(small[0]).sub_(big[1] * small[1])
    maps = torch.where((big[2] * small[2]) > 0, ncc, torch.full_like(ncc, -1.0)).view(n, k, lv.width, lv.width)
    values, where = maps.flatten(2).max(dim=2)
    pick = values.argmax(dim=1)  # the first of the best: ties resolve as in align_exact
    rows = torch.arange(n)
    best_maps, best, at = maps[rows, pick], values[rows, pick], where[rows, pick]
    ty, tx = at // lv.width, at % lv.width
    dy, dx = (ty + lv.low) % lv.pad, (tx + lv.low) % lv.pad  # indices in a full circular map
    sidelobes = _sidelobes(best_maps, dy, dx, lv, params.sidelobe_radius)
    out = []
    for p, (peak, sidelobe, j, y, x, cy, cx) in enumerate(zip(best.tolist(), sidelobes.tolist(), pick.tolist(), ty.tolist(),
                                                              tx.tolist(), dy.tolist(), dx.tolist())):
        i, crop_is, d = combos[p][j]
        side = lv.sides[i]
        out.append(Alignment(peak - params.background_weight * max(sidelobe, 0.0), peak, sidelobe, d, params.scales[i], crop_is,
                             _signed_shift(cy, cx, lv.pad), float(lv.counts[i, y, x]) / (side * side)))
    return out


def _sidelobes(maps: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, lv: _Level, radius: int) -> torch.Tensor:
    """verify._sidelobe of each (W, W) map of kept shifts, read as a full circular map that is -1
    elsewhere: the best NCC farther than ``radius`` (circular distance) from the peak (dy, dx)."""
    kept = torch.arange(lv.low, lv.high + 1) % lv.pad
    dist = lambda c: torch.minimum((kept[None] - c[:, None]) % lv.pad, (c[:, None] - kept[None]) % lv.pad)  # noqa: E731
    near = (dist(dy) <= radius)[:, :, None] & (dist(dx) <= radius)[:, None, :]
    return maps.masked_fill(near, -1.0).flatten(1).amax(1).clamp(min=-1.0)


def align_coarse_to_fine(a: Prepared, b: Prepared, params: VerifyParams) -> Alignment:
    """One pair's align_batch."""
    return align_batch([(a, b)], params)[0]
