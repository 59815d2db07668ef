"""Pixels of a manifest row as a float image in [0, 1] for the embedders, whatever the source.

Scaling follows the one policy of :mod:`dinov2_repro.io.raster` that the trainer applies to the
same row (per-scene 2-98 percentile ranges for raster rows, nodata 0; /255 for pictures), so
dedup and clustering decide on the pixels the model is trained on. Only the channel count is
adapted here, to what an embedder takes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dinov2_repro.io.manifest import resolve_row_path
from dinov2_repro.io.raster import RowPixels, scale_array

# One policy object per process: its per-scene range cache is shared by every row of a scene.
_PIXELS = RowPixels()


def fit_channels(pixels: np.ndarray, channels: int = 3) -> np.ndarray:
    """(C, H, W) -> (channels, H, W): extra bands are dropped, missing ones repeat the available
    bands cyclically."""
    if pixels.ndim != 3:
        raise ValueError(f"expected (C, H, W) pixels, got shape {pixels.shape}")
    return np.ascontiguousarray(pixels[[c % pixels.shape[0] for c in range(channels)]])


def to_unit(pixels: np.ndarray, channels: int = 3) -> np.ndarray:
    """An in-memory (C, H, W) array (e.g. a crop of a scene read by hand) under the shared policy,
    the array being its own scene, with ``channels`` channels."""
    return fit_channels(scale_array(pixels), channels)


def load_row_image(row: dict, manifest_dir: str | Path, bands: Sequence[int] | None = None, channels: int = 3) -> np.ndarray:
    """A row's pixels under the shared scaling policy, as float32 (channels, H, W) in [0, 1]."""
    path = resolve_row_path(row, manifest_dir)
    if not path.is_file():
        raise FileNotFoundError(f"manifest row {row.get('path')!r}: image file {path} does not exist")
    return fit_channels(_PIXELS.unit(row, path, bands), channels)


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
