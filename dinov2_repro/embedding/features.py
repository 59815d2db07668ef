"""Backbone features of images in [0, 1]: the header's normalisation, then CLS, mean patch or both.

- ``cls``: the normalised CLS token (``x_norm_clstoken``), ``embed_dim`` values;
- ``mean_patch``: the mean of the normalised patch tokens (``x_norm_patchtokens``), ``embed_dim``;
- ``both``: ``[cls, mean_patch]`` concatenated, ``2 * embed_dim`` (the DINOv2 linear-probe
  feature); index.json's ``feature_slices`` says which columns are which.

Rows are stored raw, as the shard format wants (readers L2-normalise).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..config import ConfigError

FEATURES = ("cls", "mean_patch", "both")


def feature_slices(features: str, embed_dim: int) -> dict[str, list[int]]:
    """Columns [start, stop) of each part of a row."""
    if features == "both":
        return {"cls": [0, embed_dim], "mean_patch": [embed_dim, 2 * embed_dim]}
    return {features: [0, embed_dim]}


class BackboneFeatures(nn.Module):
    """(B, C, S, S) images in [0, 1] -> (B, D) float32 features of ``features`` kind."""

    def __init__(self, model: nn.Module, *, mean: Sequence[float], std: Sequence[float], features: str) -> None:
        super().__init__()
        if features not in FEATURES:
            raise ConfigError(f"--features {features!r} unknown; choose {', '.join(FEATURES)}")
        self.model, self.features = model.eval(), features
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        out = self.model.forward_features((images - self.mean) / self.std)
        cls, patches = out["x_norm_clstoken"].float(), out["x_norm_patchtokens"].float()
        if self.features == "cls":
            return cls
        mean_patch = patches.mean(dim=1)
        return mean_patch if self.features == "mean_patch" else torch.cat([cls, mean_patch], dim=1)


def check_header(meta: Mapping[str, Any], source: str) -> tuple[list[float], list[float], int, int]:
    """(mean, std, in_chans, patch_size) of a backbone header, with errors naming ``source``."""
    in_chans, patch = int(meta["in_chans"]), int(meta["patch_size"])
    mean, std = [float(v) for v in meta["mean"]], [float(v) for v in meta["std"]]
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConfigError(f"{source}: header mean/std have {len(mean)}/{len(std)} values for in_chans={in_chans}")
    return mean, std, in_chans, patch


class RowImages(Dataset):
    """Manifest rows -> (row index, (in_chans, size, size) tensor in [0, 1], error text).

    Pixels follow the project's one scaling policy (dinov2_repro/io/raster.py: per-scene band
    ranges for rasters, /255 for pictures), as training reads the same rows. A file that fails
    to decode gives a blank image and its error text (the caller skips the row); a band count
    that does not fit the backbone is the user's to fix and raises."""

    def __init__(self, rows: Sequence[dict], *, manifest_dir: str, size: int, in_chans: int,
                 bands: Sequence[int] | None = None, scale: str = "percentile") -> None:
        self.rows, self.manifest_dir, self.size, self.in_chans = rows, manifest_dir, size, in_chans
        self.bands = list(bands) if bands else None
        self.scale = scale
        self._pixels = None  # built in the process that reads (DataLoader workers each get one)

    def __len__(self) -> int:
        return len(self.rows)

    def pixels(self, index: int) -> np.ndarray:
        from ..io.manifest import resolve_row_path
        from ..io.raster import RasterScaling, RowPixels

        if self._pixels is None:
            self._pixels = RowPixels(scaling=RasterScaling(scale=self.scale))
        row = self.rows[index]
        path = resolve_row_path(row, self.manifest_dir)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        image = self._pixels.unit(row, path, self.bands)
        if image.shape[0] != self.in_chans:
            raise ConfigError(f"{path}: {image.shape[0]} band(s) read but the backbone takes {self.in_chans}; "
                              f"choose {self.in_chans} with --bands (1-based band numbers)")
        return image

    def __getitem__(self, index: int) -> tuple[int, Tensor, str]:
        from ..curation.images import resize_tensor
        from .sources import describe_error, unreadable_errors

        try:
            image = torch.from_numpy(self.pixels(index))
        except unreadable_errors() as error:
            return index, torch.zeros(self.in_chans, self.size, self.size), describe_error(error)
        if image.shape[-2:] != (self.size, self.size):
            image = resize_tensor(image, self.size)
        return index, image, ""
