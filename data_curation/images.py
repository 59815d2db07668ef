"""Pixels of a manifest row as a 3-channel float image in [0, 1], whatever the source.

GeoTIFF rows are read through their window and bands; every image is contrast-stretched per
channel (2nd-98th percentile) so descriptors compare scenes of any radiometry, and so that
brightness/contrast changes of a copy matter less.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .io import resolve_row_path

GEOTIFF_SUFFIXES = (".tif", ".tiff")


def read_row_pixels(row: dict, manifest_dir: str | Path, bands: Sequence[int] | None = None) -> np.ndarray:
    """(C, H, W) float32 pixels of a row; nodata/masked pixels are NaN."""
    path = resolve_row_path(row, manifest_dir)
    if not path.is_file():
        raise FileNotFoundError(f"manifest row {row.get('path')!r}: image file {path} does not exist")
    if path.suffix.lower() in GEOTIFF_SUFFIXES or "window" in row:
        import rasterio
        from rasterio.windows import Window

        with rasterio.open(path) as src:
            band_list = list(bands or row.get("bands") or range(1, src.count + 1))
            if any(not 1 <= int(b) <= src.count for b in band_list):
                raise ValueError(f"{path}: bands {band_list} out of range (1..{src.count})")
            window = Window(*row["window"]) if row.get("window") else None
            data = src.read(band_list, window=window).astype(np.float32)
            mask = src.read_masks(band_list, window=window) if hasattr(src, "read_masks") else None
            if src.nodata is not None and not np.isnan(src.nodata):
                data[data == src.nodata] = np.nan
            if mask is not None:
                data[mask == 0] = np.nan
        return data
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return array.transpose(2, 0, 1)


def to_unit(pixels: np.ndarray, channels: int = 3) -> np.ndarray:
    """(C, H, W) any radiometry -> (channels, H, W) float32 in [0, 1], percentile-stretched per
    channel; extra bands are dropped and missing ones repeat the available bands cyclically."""
    if pixels.ndim != 3:
        raise ValueError(f"expected (C, H, W) pixels, got shape {pixels.shape}")
    pixels = pixels[[c % pixels.shape[0] for c in range(channels)]]
    out = np.empty(pixels.shape, np.float32)
    for c in range(channels):
        band = pixels[c]
        finite = band[np.isfinite(band)]
        if finite.size == 0:
            out[c] = 0.0
            continue
        low, high = np.percentile(finite, (2, 98))
        scale = high - low if high > low else 1.0
        out[c] = np.clip((np.nan_to_num(band, nan=float(np.median(finite))) - low) / scale, 0.0, 1.0)
    return out


def load_row_image(row: dict, manifest_dir: str | Path, bands: Sequence[int] | None = None, channels: int = 3) -> np.ndarray:
    return to_unit(read_row_pixels(row, manifest_dir, bands), channels)


def resize_tensor(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, size), antialiased (aspect ratio not kept: copies keep it anyway)."""
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


class ManifestImages(Dataset):
    """Rows -> (index, (channels, img_size, img_size) tensor in [0, 1])."""

    def __init__(self, *, rows: Sequence[dict], manifest_dir: str | Path, img_size: int,
                 bands: Sequence[int] | None = None, channels: int = 3) -> None:
        self.rows = rows
        self.channels = channels
        self.manifest_dir = Path(manifest_dir)
        self.img_size = img_size
        self.bands = list(bands) if bands else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        image = torch.from_numpy(load_row_image(self.rows[index], self.manifest_dir, self.bands, self.channels))
        return index, resize_tensor(image, self.img_size)
