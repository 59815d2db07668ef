"""Raster pixels: windows, the tile grid, band selection, nodata, and THE pixel-scaling policy.

Pixel-scaling policy (one per row, the same in every stage: the curation embedder, the copy
detector, the trainer's ``Manifest``/``GeoTiff`` datasets), implemented by :class:`RowPixels`:

- A raster row (a ``window`` or ``bands`` key, or a ``.tif/.tiff/.vrt/.jp2`` path) is read through
  rasterio, its ``bands`` (1-based; default all) inside its ``window`` (default the whole file).
  Each band is mapped linearly to [0, 1] and clipped, with one range per band per SCENE: by
  default the 2nd-98th percentile of the scene's valid pixels (computed once per scene and band
  set, on a read decimated to at most 1024 px per side), or a fixed ``LOW,HIGH`` for all bands,
  or one pair per band (:class:`RasterScaling`). Per-scene rather than per-tile ranges keep a
  dark water tile dark instead of stretching its noise to full contrast, and make a tile's
  pixels independent of how the scene was cut.
- Nodata pixels (the file's nodata value, NaN/inf, the file's mask, or outside the scene for a
  window that overhangs it) become 0 after scaling.
- Any other row is an 8-bit picture read with PIL as RGB and divided by 255 (its values are
  already display-scaled); the trainer keeps it as a PIL image for its augmentations, whose
  ``ToTensor`` does that same division.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from ..config import ConfigError
from .files import RASTER_SUFFIXES

STATS_MAX_SIDE = 1024  # statistics read: at most this many pixels per side


def tile_windows(width: int, height: int, size: int, stride: int) -> Iterator[tuple[int, int, int, int]]:
    """Full ``size`` x ``size`` windows (col_off, row_off, w, h) every ``stride`` pixels, row by row
    (a partial border strip is not a tile)."""
    for row_off in range(0, height - size + 1, stride):
        for col_off in range(0, width - size + 1, stride):
            yield (col_off, row_off, size, size)


def window_bounds(window: Sequence[int], transform) -> list[float]:
    """[left, bottom, right, top] of ``window`` ([col_off, row_off, width, height]) in the CRS of
    ``transform`` (an affine.Affine). Written with ``@``: rasterio's own helper still uses the
    ``*`` form that affine deprecates, one warning per tile."""
    col_off, row_off, width, height = window
    left, bottom = transform @ (col_off, row_off + height)
    right, top = transform @ (col_off + width, row_off)
    return [left, bottom, right, top]


def parse_float_list(text: str, *, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None


class RasterReadError(ConfigError):
    """A raster whose pixels cannot be read (truncated or corrupt file): one line naming the file
    and the window, exit 2 through the CLI's ConfigError handling."""


@contextlib.contextmanager
def raster_read_guard(path: str | os.PathLike, window: Sequence[int] | None = None) -> Iterator[None]:
    """Turn rasterio/GDAL read failures inside the block into one :class:`RasterReadError` that
    names ``path`` and ``window`` ([col_off, row_off, width, height]; None = the whole file) and
    GDAL's own reason (which rasterio keeps as the exception's cause)."""
    from rasterio.errors import RasterioError

    try:
        yield
    except RasterioError as err:
        if not Path(path).exists():
            raise RasterReadError(f"{path}: file does not exist") from None
        reasons = []
        cause: BaseException | None = err
        while cause is not None and len(reasons) < 3:
            text = " ".join(str(cause).split())
            if text and "See previous exception" not in text and text not in reasons:
                reasons.append(text)
            cause = cause.__cause__ or cause.__context__
        where = "the whole file" if window is None else "window [col_off, row_off, width, height] = " + str(
            [int(v) for v in window])
        raise RasterReadError(f"{path}: cannot read {where} ({reasons[0] if reasons else type(err).__name__}); "
                              f"the file is truncated or corrupt") from None


def band_count(path: str | os.PathLike) -> int:
    import rasterio

    with rasterio.open(path) as src:
        return src.count


def check_bands(path: str | os.PathLike, bands: Sequence[int] | None, count: int) -> list[int]:
    """``bands`` (1-based) checked against the file's ``count``; None means all bands."""
    if bands is None:
        return list(range(1, count + 1))
    bad = [b for b in bands if not 1 <= int(b) <= count]
    if bad:
        raise ValueError(f"bands={list(bands)}: {path} has {count} bands (1-based indexes), invalid: {bad}")
    return [int(b) for b in bands]


def valid_mask(data: np.ndarray, nodatavals: Sequence, bands: Sequence[int], masks: np.ndarray | None = None) -> np.ndarray:
    """(C, H, W) bool: finite, not the band's nodata value, and not masked out (``masks`` == 0)."""
    valid = np.isfinite(data)
    for b, band in enumerate(bands):
        nodata = nodatavals[band - 1]
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            valid[b] &= data[b] != nodata
    if masks is not None:
        valid &= masks != 0
    return valid


def read_decimated(path: str | os.PathLike, bands: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The whole scene shrunk to at most STATS_MAX_SIDE px per side (for statistics): (data, valid)."""
    import rasterio

    bands = list(bands)
    with raster_read_guard(path), rasterio.open(path) as src:
        factor = max(1, math.ceil(max(src.height, src.width) / STATS_MAX_SIDE))
        shape = (len(bands), math.ceil(src.height / factor), math.ceil(src.width / factor))
        data = src.read(bands, out_shape=shape).astype(np.float64)
        masks = src.read_masks(bands, out_shape=shape)
        return data, valid_mask(data, src.nodatavals, bands, masks)


class RasterScaling:
    """How raster bands map to [0, 1]: ``scale="percentile"`` (per-scene ``percentiles`` of the
    valid pixels), ``"LOW,HIGH"`` (one fixed range) or ``"L1,H1,L2,H2,..."`` (one per band)."""

    def __init__(self, *, scale: str = "percentile", percentiles: tuple[float, float] = (2.0, 98.0)) -> None:
        self.percentiles = tuple(float(p) for p in percentiles)
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must be LOW,HIGH with 0 <= LOW < HIGH <= 100, got {percentiles}")
        self.fixed: np.ndarray | None = None
        if scale != "percentile":
            values = parse_float_list(str(scale), what="scale")
            if len(values) < 2 or len(values) % 2:
                raise ValueError(f"scale: expected 'percentile', 'LOW,HIGH' or per-band pairs, got {scale!r}")
            self.fixed = np.asarray(values, dtype=np.float64).reshape(-1, 2)
            if np.any(self.fixed[:, 1] <= self.fixed[:, 0]):
                raise ValueError(f"scale: every HIGH must exceed its LOW, got {scale!r}")

    def ranges(self, path: str | os.PathLike, bands: Sequence[int],
               decimated: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """(len(bands), 2) array of [low, high] per band; ``decimated`` reuses a read_decimated result."""
        bands = list(bands)
        if self.fixed is not None:
            if len(self.fixed) == 1:
                return np.repeat(self.fixed, len(bands), axis=0)
            if len(self.fixed) != len(bands):
                raise ValueError(f"scale gives {len(self.fixed)} ranges but {path} is read with {len(bands)} bands")
            return self.fixed
        data, valid = decimated if decimated is not None else read_decimated(path, bands)
        ranges = np.zeros((len(bands), 2))
        for b in range(len(bands)):
            values = data[b][valid[b]]
            if values.size == 0:
                raise ValueError(f"{path}: band {bands[b]} has no valid (non-nodata) pixels")
            low, high = np.percentile(values, self.percentiles)
            ranges[b] = (low, high if high > low else low + 1.0)
        return ranges


def read_window(path: str | os.PathLike, bands: Sequence[int], window: Sequence[int] | None,
                ranges: np.ndarray) -> np.ndarray:
    """Read ``bands`` inside ``window`` ([col_off, row_off, width, height]; None = whole file) and
    scale them with ``ranges``: float32 (C, H, W) in [0, 1], nodata 0 (the module's policy)."""
    import rasterio
    from rasterio.windows import Window

    bands = list(bands)
    with raster_read_guard(path, window), rasterio.open(path) as src:
        col_off, row_off, width, height = (int(v) for v in window) if window is not None else (0, 0, src.width, src.height)
        # Pixels outside the scene (a window overhanging its edge) are nodata even when the file
        # declares no nodata value: only the part inside is read (rasterio's boundless read goes
        # through deprecated affine arithmetic), the rest stays invalid.
        data = np.zeros((len(bands), height, width))
        valid = np.zeros(data.shape, dtype=bool)
        c0, r0 = max(col_off, 0), max(row_off, 0)
        c1, r1 = min(col_off + width, src.width), min(row_off + height, src.height)
        if c1 > c0 and r1 > r0:
            inside = Window(c0, r0, c1 - c0, r1 - r0)
            part = src.read(bands, window=inside).astype(np.float64)
            target = (slice(None), slice(r0 - row_off, r1 - row_off), slice(c0 - col_off, c1 - col_off))
            data[target] = part
            valid[target] = valid_mask(part, src.nodatavals, bands, src.read_masks(bands, window=inside))
    return apply_ranges(data, valid, ranges)


def apply_ranges(data: np.ndarray, valid: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Map each band linearly from its [low, high] to [0, 1], clip, and set invalid pixels to 0."""
    low, high = ranges[:, 0, None, None], ranges[:, 1, None, None]
    with np.errstate(invalid="ignore"):  # NaN pixels are invalid and zeroed just below
        scaled = np.clip((data - low) / (high - low), 0.0, 1.0)
    scaled[~valid] = 0.0
    return scaled.astype(np.float32)


def scale_array(pixels: np.ndarray, *, scaling: RasterScaling | None = None) -> np.ndarray:
    """The policy applied to an in-memory (C, H, W) array that is its own scene: ranges from its
    finite pixels, float32 in [0, 1], non-finite pixels 0."""
    if pixels.ndim != 3:
        raise ValueError(f"expected (C, H, W) pixels, got shape {pixels.shape}")
    data = pixels.astype(np.float64)
    valid = np.isfinite(data)
    ranges = (scaling or RasterScaling()).ranges("in-memory array", list(range(1, len(data) + 1)), (data, valid))
    return apply_ranges(data, valid, ranges)


def read_pil_rgb(path: str | os.PathLike) -> Image.Image:
    with Image.open(path) as image:
        image.load()  # decode now so a truncated file fails here, inside the caller's error handling
        return image.convert("RGB")


def pil_to_unit(image: Image.Image) -> np.ndarray:
    """An RGB picture as float32 (3, H, W) in [0, 1]: the division by 255 the trainer's ToTensor does."""
    return (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1).copy()


def is_raster_row(row: dict, path: str | os.PathLike) -> bool:
    return "window" in row or "bands" in row or Path(path).suffix.lower() in RASTER_SUFFIXES


class RowPixels:
    """The policy of the module docstring, with a per-process cache of per-scene ranges (one
    statistics read per scene and band set)."""

    def __init__(self, *, scaling: RasterScaling | None = None) -> None:
        self.scaling = scaling or RasterScaling()
        self._ranges: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    def scene_ranges(self, path: str | os.PathLike, bands: Sequence[int],
                     decimated: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        key = (str(path), tuple(bands))
        if key not in self._ranges:
            self._ranges[key] = self.scaling.ranges(path, bands, decimated)
        return self._ranges[key]

    def raster(self, row: dict, path: str | os.PathLike, bands: Sequence[int] | None = None) -> np.ndarray:
        """A raster row's scaled pixels; ``bands`` overrides the row's own ``bands``."""
        chosen = check_bands(path, bands or row.get("bands"), band_count(path))
        return read_window(path, chosen, row.get("window"), self.scene_ranges(path, chosen))

    def unit(self, row: dict, path: str | os.PathLike, bands: Sequence[int] | None = None) -> np.ndarray:
        """Any row as float32 (C, H, W) in [0, 1] under the policy."""
        if is_raster_row(row, path):
            return self.raster(row, path, bands)
        return pil_to_unit(read_pil_rgb(path))
