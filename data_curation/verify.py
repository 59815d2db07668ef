"""Pixel verification of near-duplicate candidate pairs: is image B a copy of (part of) image A?

The kNN stage proposes pairs for recall; this stage decides from the pixels. For each pair the
best alignment is searched over
- the 8 flips/90-degree rotations of B,
- a small scale search: one image is a crop of the other keeping ``scales`` of its side
  (both directions; scale 1 = same extent, e.g. JPEG/resampled/recoloured copies), and
- every translation (a shifted window of the same scene overlaps by part of the tile),
and the score is the normalised cross-correlation (NCC) of the overlapping pixels, computed for
all translations at once with FFTs (masked NCC: sums over the overlap only). Overlaps smaller
than ``min_overlap`` of the smaller image are not considered: a thin sliver matches by chance.

Images are compared as band-passed grey levels: the low-pass removes JPEG blocking and sensor
noise, the high-pass removes gradients and the overall brightness, so two smooth tiles of water
do not correlate just because both get darker to the east. NCC itself ignores affine changes of
brightness and contrast. Copies keep the fine structure of their source; distinct tiles of a
homogeneous texture (forest canopy, fields) share its statistics but not its pixels.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class VerifyParams:
    """Alignment search and comparison settings (config keys ``dedup.verify.*``)."""

    work_size: int = 64
    scales: tuple[float, ...] = (1.0, 0.9, 0.8, 0.75, 0.7, 0.6)
    min_overlap: float = 0.5
    low_sigma: float = 0.8
    high_sigma: float = 5.0
    sidelobe_radius: int = 4
    # Weight of the best non-copy evidence (sidelobe here; also the background neighbours in background.py).
    background_weight: float = 0.5
    # exact: every (scale, crop side, pose) combination at full resolution; coarse_to_fine: all
    # ranked at low resolution, the best ``coarse_candidates`` re-scored exactly (verify_fast.py).
    method: str = "coarse_to_fine"
    coarse_candidates: int = 4

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Alignment:
    """Best alignment of a pair. ``score`` = ``peak`` - weight x ``sidelobe``: the NCC at the best
    alignment minus (a fraction of) the best NCC of the same pose at shifts more than ``sidelobe_radius`` away
    (the pair-only score; the pipeline also compares the peak to background neighbours, background.py).
    A copy has one sharp peak; two distinct images that both hold a straight edge or a smooth
    ramp align almost as well at many shifts along it, so their peak is not distinctive.
    Also: dihedral index of B (0 = identity), side fraction of the cropped image in the other,
    which image is the crop, shift in working pixels, overlap as a fraction of the smaller image."""

    score: float
    peak: float
    sidelobe: float
    dihedral: int
    scale: float
    crop_is: str
    shift: tuple[int, int]
    overlap: float


def to_gray(image: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> (size, size) float32 grey image (mean of the channels)."""
    t = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image, dtype=torch.float32)
    if t.ndim == 2:
        t = t[None]
    gray = t.mean(0, keepdim=True)[None]
    return F.interpolate(gray, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0].float()


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W), reflect padding (no dark border halo)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    y = F.pad(x[:, None], (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, kernel.view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, kernel.view(1, 1, -1, 1))[:, 0]


def band_pass(x: torch.Tensor, low_sigma: float, high_sigma: float) -> torch.Tensor:
    """Difference of Gaussians of (N, H, W): keeps structure between the two scales."""
    smooth = _gaussian_blur(x, low_sigma) if low_sigma > 0 else x
    return smooth - _gaussian_blur(x, high_sigma)


def dihedral_stack(x: torch.Tensor) -> torch.Tensor:
    """(H, W) -> (8, H, W): the 4 rotations of x and of its horizontal flip."""
    flipped = x.flip(-1)
    return torch.stack([torch.rot90(base, k, dims=(-2, -1)) for base in (x, flipped) for k in range(4)])


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    return F.interpolate(x[:, None].float(), size=(side, side), mode="bilinear", antialias=True,
                         align_corners=False)[:, 0].float()


def _corr(fa: torch.Tensor, fb: torch.Tensor, pad: int) -> torch.Tensor:
    """Cross-correlation from spectra: out[s] = sum_p a(p) b(p - s) (circular over ``pad``)."""
    return torch.fft.irfft2(fa * fb.conj(), s=(pad, pad))


def _spectra(big: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectra of ``big`` and of its square, zero-padded as _masked_ncc needs them."""
    pad = 2 * big.shape[-1]
    return torch.fft.rfft2(big, s=(pad, pad)), torch.fft.rfft2(big * big, s=(pad, pad))


@functools.lru_cache(maxsize=64)
def _mask_spectra(size: int, side: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spectra of the all-ones big and small images and the overlap pixel count per shift (the
    same for every pair of a given size: computed once)."""
    pad = 2 * size
    f_mbig = torch.fft.rfft2(torch.ones((1, size, size), dtype=dtype), s=(pad, pad))
    f_msmall = torch.fft.rfft2(torch.ones((1, side, side), dtype=dtype), s=(pad, pad))
    return f_mbig, f_msmall, _corr(f_mbig, f_msmall, pad)[0].round()


def _masked_ncc(big: torch.Tensor, small: torch.Tensor, min_count: float,
                big_spectra: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NCC of ``small`` (N or 1, h, h) placed at every shift over ``big`` (N or 1, S, S), over the
    overlap only (batches broadcast). Returns (ncc (N, P, P), overlap pixel count (P, P)); shifts
    with fewer than ``min_count`` overlapping pixels get NCC -1."""
    size, side = big.shape[-1], small.shape[-1]
    pad = 2 * size  # >= size + side: no wrap-around; a power of two keeps the FFTs fast
    spec = lambda z: torch.fft.rfft2(z, s=(pad, pad))  # noqa: E731 - local shorthand
    # The big image is the same at every crop scale of a pair: its spectra may come precomputed.
    f_big, f_big2 = big_spectra if big_spectra is not None else (spec(big), spec(big * big))
    f_small, f_small2 = spec(small), spec(small * small)
    f_mbig, f_msmall, count = _mask_spectra(size, side, big.dtype)
    sum_a = _corr(f_big, f_msmall, pad)
    sum_a2 = _corr(f_big2, f_msmall, pad)
    sum_b = _corr(f_mbig, f_small, pad)
    sum_b2 = _corr(f_mbig, f_small2, pad)
    sum_ab = _corr(f_big, f_small, pad)
    n = count.clamp(min=1.0)
    cov = sum_ab - sum_a * sum_b / n
    var_a = (sum_a2 - sum_a * sum_a / n).clamp(min=0.0)
    var_b = (sum_b2 - sum_b * sum_b / n).clamp(min=0.0)
    ncc = cov / torch.sqrt(var_a * var_b).clamp(min=1e-12)
    valid = (count >= min_count) & (var_a > 1e-6 * n) & (var_b > 1e-6 * n)
    return torch.where(valid, ncc, torch.full_like(ncc, -1.0)), count


class Prepared:
    """One image as verification compares it: its working-size grey image and, computed on first
    use and kept (an image is in many pairs), the band-passed stacks both roles of a pair need
    (the whole image, its 8 poses, and both shrunk to each crop scale's side)."""

    def __init__(self, gray: torch.Tensor, params: VerifyParams) -> None:
        self.gray, self.params = gray, params
        self._stacks: dict[tuple[str, int], torch.Tensor] = {}
        self.extras: dict[str, object] = {}  # other per-image data an aligner keeps (verify_fast.py)

    def _band_pass(self, x: torch.Tensor) -> torch.Tensor:
        return band_pass(x, self.params.low_sigma, self.params.high_sigma)

    def _get(self, key: tuple[str, int]) -> torch.Tensor:
        if key not in self._stacks:
            poses, side = key
            base = dihedral_stack(self.gray) if poses == "dihedral" else self.gray[None]
            self._stacks[key] = self._band_pass(base if side == self.gray.shape[-1] else _resize(base, side))
        return self._stacks[key]

    def plain(self, side: int) -> torch.Tensor:
        """(1, side, side): the image shrunk to ``side``, band-passed."""
        return self._get(("plain", side))

    def poses(self, side: int) -> torch.Tensor:
        """(8, side, side): its 8 flips/rotations shrunk to ``side``, band-passed."""
        return self._get(("dihedral", side))


def prepare(image: np.ndarray | torch.Tensor, params: VerifyParams) -> Prepared:
    """The image as verification compares it (cache it per image)."""
    return Prepared(to_gray(image, params.work_size), params)


def align(a: Prepared, b: Prepared, params: VerifyParams) -> Alignment:
    """Best alignment of prepared images a, b (``prepare``), by ``params.method``."""
    if params.method == "coarse_to_fine":
        from .verify_fast import align_coarse_to_fine

        return align_coarse_to_fine(a, b, params)
    if params.method != "exact":
        raise ValueError(f"dedup.verify.method must be exact or coarse_to_fine, got {params.method!r}")
    return align_exact(a, b, params)


def align_exact(a: Prepared, b: Prepared, params: VerifyParams) -> Alignment:
    """Best alignment of prepared images a, b over every combination at full resolution."""
    size = params.work_size
    best_peak, best_key, best_map = -2.0, None, None
    spectra: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for scale in params.scales:
        side = max(8, int(round(scale * size)))
        if side == size:  # same extent: B's 8 poses over A
            candidates = [("none", a.plain(size), b.poses(size))]
        else:  # B is a crop of A, or A is a crop of B (A shrunk into each pose of B)
            candidates = [("b", a.plain(size), b.poses(side)), ("a", b.poses(size), a.plain(side))]
        for crop_is, big, small in candidates:
            role = "b_poses" if crop_is == "a" else "a_image"  # which of the pair's two big images this is
            if role not in spectra:
                spectra[role] = _spectra(big)
            ncc, count = _masked_ncc(big, small, params.min_overlap * side * side, spectra[role])
            value, where = ncc.reshape(len(ncc), -1).max(dim=1)
            d = int(value.argmax())
            if float(value[d]) > best_peak:
                best_peak, best_map = float(value[d]), ncc[d]
                best_key = (d, scale, crop_is, int(where[d]), float(count.reshape(-1)[int(where[d])]) / (side * side))
    if best_map is None:
        return Alignment(-1.0, -1.0, -1.0, 0, 1.0, "none", (0, 0), 0.0)
    d, scale, crop_is, pos, overlap = best_key
    pad = best_map.shape[-1]
    dy, dx = divmod(pos, pad)
    sidelobe = _sidelobe(best_map, dy, dx, params.sidelobe_radius)
    return Alignment(best_peak - params.background_weight * max(sidelobe, 0.0), best_peak, sidelobe, d, scale, crop_is, _signed_shift(dy, dx, pad), overlap)


def _sidelobe(ncc: torch.Tensor, dy: int, dx: int, radius: int) -> float:
    """Best NCC farther than ``radius`` (circular shift distance) from the peak at (dy, dx)."""
    pad = ncc.shape[-1]
    offsets = torch.arange(pad)
    ry = torch.minimum((offsets - dy) % pad, (dy - offsets) % pad)
    rx = torch.minimum((offsets - dx) % pad, (dx - offsets) % pad)
    near = (ry[:, None] <= radius) & (rx[None, :] <= radius)
    return float(ncc.masked_fill(near, -1.0).max())


def _signed_shift(dy: int, dx: int, pad: int) -> tuple[int, int]:
    return (dy - pad if dy > pad // 2 else dy, dx - pad if dx > pad // 2 else dx)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: the FFTs of one pair are tiny, and a second OpenMP thread on a busy
    machine makes them 10-80x slower (spin-waiting), never faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


PAIRS_PER_BATCH = 16  # coarse_to_fine: pairs aligned together (fewer, larger FFT calls; ~10 MB of buffers)


def verify_pairs(src: np.ndarray, dst: np.ndarray, load: Callable[[int], np.ndarray], params: VerifyParams,
                 *, cache_size: int | None = None) -> tuple[np.ndarray, list[Alignment]]:
    """Alignment score of every pair (src[e], dst[e]); ``load(i)`` gives image i as (C, H, W) in
    [0, 1]. Prepared images are cached since an image is in several pairs (bounded: 512 images
    of ~0.6 MB for the exact search, 256 of ~3.3 MB for coarse_to_fine at work_size 64)."""
    if cache_size is None:
        cache_size = 512 if params.method == "exact" else 256
    cache: dict[int, Prepared] = {}

    def get(i: int) -> Prepared:
        if i not in cache:
            if len(cache) >= cache_size:
                cache.pop(next(iter(cache)))
            cache[i] = prepare(load(i), params)
        return cache[i]

    src, dst = np.asarray(src), np.asarray(dst)
    with single_thread():
        if params.method == "coarse_to_fine":  # many pairs per FFT call (a chunk keeps its images alive)
            from .verify_fast import align_batch

            alignments = []
            for start in range(0, len(src), PAIRS_PER_BATCH):
                chunk = zip(src[start : start + PAIRS_PER_BATCH].tolist(), dst[start : start + PAIRS_PER_BATCH].tolist())
                alignments += align_batch([(get(a), get(b)) for a, b in chunk], params)
        else:
            alignments = [align(get(int(a)), get(int(b)), params) for a, b in zip(src, dst)]
    return np.array([al.score for al in alignments], dtype=np.float64), alignments


def params_from_config(section) -> VerifyParams:
    """``dedup.verify`` config section -> VerifyParams (unset keys keep the defaults)."""
    values = {k: section[k] for k in ("work_size", "scales", "min_overlap", "low_sigma", "high_sigma", "sidelobe_radius", "background_weight",
                                            "method", "coarse_candidates") if k in section}
    if "scales" in values:
        values["scales"] = tuple(float(s) for s in values["scales"])
    return VerifyParams(**values)


def verify_images(a: np.ndarray, b: np.ndarray, params: VerifyParams | None = None) -> Alignment:
    """Convenience: align two (C, H, W) images in [0, 1]."""
    params = params or VerifyParams()
    with single_thread():
        return align(prepare(a, params), prepare(b, params), params)

