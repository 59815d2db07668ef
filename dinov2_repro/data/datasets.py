"""Training datasets built from reference-style strings ``Name:key=value:key=value``.

- ``ImageFolder:root=DIR[:extensions=jpg,png][:labels=subdirs|none]``: every image under DIR
  (recursive, sorted), read with PIL as RGB. Labels: index of the first-level subfolder
  (``labels=subdirs``) or -1 (default ``none``).
- ``Sample:[tile=56][:root=DIR]``: the images that installed data packages ship (Landsat-7
  true-colour tiles, the RMNP scene, scikit-image photos; ``dinov2_repro.data.sample_data``),
  cut into ``tile`` px PNGs once under ``root`` (default ``$DINOV2_REPRO_CACHE`` or
  ``~/.cache/dinov2_repro``, in ``sample_images_<tile>``) and read as an ImageFolder. Needs no
  dataset on disk: the tiny CPU recipe's default.
- ``Manifest:path=FILE.jsonl[:scale=...][:percentiles=2,98]``: the curation manifest
  (format in ``dinov2_repro.io.manifest``). Rows with ``window`` or ``bands``, or a GeoTIFF path (.tif/.tiff/.vrt/.jp2), are
  read through rasterio; other rows with PIL. Relative paths are relative to the manifest's folder.
  ``label`` may be an int or a class name (names map to indices in sorted order); missing = -1.
  ``.parquet`` manifests need pyarrow.
- ``GeoTiff:root=DIR|FILE[:bands=1,2,3][:tile=224][:stride=224][:scale=...][:percentiles=2,98][:max_nodata=0.5]``:
  a grid of tiles over every GeoTIFF under root, read with windowed reads; tiles whose nodata
  fraction exceeds ``max_nodata`` are dropped. Label -1.

Raster items are float tensors (C, H, W) in [0, 1] for ANY band count, 3 included: raster bands
are not necessarily RGB, and keeping one item type per dataset keeps batches stackable.
PIL items are RGB images. DataAugmentationDINO accepts both.

Raster scaling follows the one policy of :mod:`dinov2_repro.io.raster` (shared with curation):
``scale=percentile`` (default) maps each band's 2-98 ``percentiles`` of the scene's valid pixels to
[0, 1] and clips; ``LOW,HIGH`` uses one fixed range for all bands; ``L1,H1,L2,H2,...`` gives one
range per selected band. Nodata pixels become 0 after scaling.

Unreadable files raise from ``__getitem__`` (the loader's wrapper skips and counts them); a missing
root or an empty dataset raises at construction, naming the path.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..io.files import GEOTIFF_SUFFIXES, IMAGE_EXTENSIONS, is_image_file
from ..io.manifest import read_manifest, resolve_row_path
from ..io.raster import (
    RasterScaling,
    RowPixels,
    band_count,
    check_bands,
    is_raster_row,
    read_decimated,
    read_pil_rgb,
    parse_float_list,
    read_window,
    tile_windows,
)

logger = logging.getLogger("dinov2_repro.data")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``Name:key=value:...`` into (Name, {key: value})."""
    name, *parts = spec.split(":")
    options: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"dataset spec {spec!r}: expected key=value, got {part!r}")
        options[key.strip()] = value.strip()
    return name.strip(), options


def _int_list(text: str, *, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None


# --------------------------------------------------------------------------------------------- datasets
class ImageFolderDataset(Dataset):
    def __init__(self, *, root: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, labels: str = "none") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: root {self.root} does not exist or is not a folder")
        if labels not in ("none", "subdirs"):
            raise ValueError(f"ImageFolder: labels must be 'none' or 'subdirs', got {labels!r}")
        files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(f, extensions))
        if not files:
            suffixes = sorted("." + e.lower().lstrip(".") for e in extensions)
            raise ValueError(f"ImageFolder: no images with extensions {suffixes} under {self.root}")
        self.files = files
        if labels == "subdirs":
            top = [f.relative_to(self.root).parts for f in files]
            loose = [str(f) for f, parts in zip(files, top) if len(parts) < 2]
            if loose:
                raise ValueError(f"ImageFolder labels=subdirs: images directly in {self.root} have no class folder, e.g. {loose[0]}")
            self.classes = sorted({parts[0] for parts in top})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[parts[0]] for parts in top]
        else:
            self.classes = []
            self.labels = [-1] * len(files)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return read_pil_rgb(self.files[index]), self.labels[index]


class ManifestDataset(Dataset):
    def __init__(self, *, path: str | os.PathLike, scaling: RasterScaling | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Manifest: file {self.path} does not exist")
        rows = read_manifest(self.path)
        if not rows:
            raise ValueError(f"Manifest {self.path} has no rows")
        self.rows = rows
        self.paths = [str(resolve_row_path(row, self.path.parent)) for row in rows]
        self.pixels = RowPixels(scaling=scaling)  # the shared scaling policy, with its per-scene cache
        raw = [r.get("label") for r in rows]
        names = {v for v in raw if isinstance(v, str)}
        if names and any(isinstance(v, (int, float)) for v in raw):
            raise ValueError(f"Manifest {self.path}: labels mix class names and integers")
        self.classes = sorted(names)
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index[v] if isinstance(v, str) else (-1 if v is None else int(v)) for v in raw]

    def __len__(self) -> int:
        return len(self.rows)

    def is_raster(self, index: int) -> bool:
        return is_raster_row(self.rows[index], self.paths[index])

    def describe(self, index: int) -> str:
        window = self.rows[index].get("window")
        return self.paths[index] + (f" window={window}" if window is not None else "")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, row = self.paths[index], self.rows[index]
        if not self.is_raster(index):
            return read_pil_rgb(path), self.labels[index]
        return torch.from_numpy(self.pixels.raster(row, path)), self.labels[index]


class GeoTiffDataset(Dataset):
    def __init__(
        self,
        *,
        root: str | os.PathLike,
        bands: list[int] | None = None,
        tile: int = 224,
        stride: int | None = None,
        scaling: RasterScaling | None = None,
        max_nodata: float = 0.5,
    ) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"GeoTiff: root {self.root} does not exist")
        if tile <= 0 or (stride is not None and stride <= 0):
            raise ValueError(f"GeoTiff: tile and stride must be > 0, got tile={tile} stride={stride}")
        self.tile, self.stride = int(tile), int(stride or tile)
        self.scaling = scaling or RasterScaling()
        scenes = [self.root] if self.root.is_file() else sorted(p for p in self.root.rglob("*") if p.suffix.lower() in GEOTIFF_SUFFIXES)
        if not scenes:
            raise ValueError(f"GeoTiff: no .tif/.tiff files under {self.root}")
        self.scenes: list[str] = []
        self.scene_bands: list[list[int]] = []
        self.scene_ranges: list[np.ndarray] = []
        self.bad_files: list[str] = []
        self.tiles: list[tuple[int, int, int]] = []  # (scene, col_off, row_off)
        first_count = None
        for scene in scenes:
            try:
                count = band_count(str(scene))
            except Exception as error:  # unreadable scene: skip it, the run goes on
                logger.warning("GeoTiff: skipping unreadable scene %s (%s)", scene, error)
                self.bad_files.append(str(scene))
                continue
            scene_bands = check_bands(str(scene), bands, count)
            if first_count is not None and len(scene_bands) != first_count:
                raise ValueError(f"GeoTiff: {scene} gives {len(scene_bands)} bands, earlier scenes {first_count}; pass bands=...")
            first_count = len(scene_bands)
            try:
                data, valid = read_decimated(str(scene), scene_bands)
                ranges = self.scaling.ranges(str(scene), scene_bands, (data, valid))
            except Exception as error:
                logger.warning("GeoTiff: skipping scene %s, statistics read failed (%s)", scene, error)
                self.bad_files.append(str(scene))
                continue
            scene_index = len(self.scenes)
            self.scenes.append(str(scene))
            self.scene_bands.append(scene_bands)
            self.scene_ranges.append(ranges)
            self.tiles.extend((scene_index, c, r) for c, r in self._grid(valid.all(axis=0), data.shape[1:], str(scene), max_nodata))
        if not self.tiles:
            raise ValueError(f"GeoTiff: no {self.tile}px tile with <= {max_nodata:.0%} nodata in the scenes under {self.root}")
        self.labels = [-1] * len(self.tiles)
        self.classes: list[str] = []

    def _grid(self, valid: np.ndarray, small_shape: tuple[int, int], path: str, max_nodata: float) -> list[tuple[int, int]]:
        import rasterio

        with rasterio.open(path) as src:
            height, width = src.height, src.width
        fy, fx = height / small_shape[0], width / small_shape[1]
        # Integral image of nodata pixels in the decimated grid: each tile's nodata fraction in O(1).
        integral = np.pad((~valid).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        keep = []
        for col, row, _, _ in tile_windows(width, height, self.tile, self.stride):
            r0, r1 = int(row / fy), max(int(row / fy) + 1, int(math.ceil((row + self.tile) / fy)))
            c0, c1 = int(col / fx), max(int(col / fx) + 1, int(math.ceil((col + self.tile) / fx)))
            bad = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
            if bad / ((r1 - r0) * (c1 - c0)) <= max_nodata:
                keep.append((col, row))
        return keep

    def __len__(self) -> int:
        return len(self.tiles)

    def window(self, index: int) -> list[int]:
        _, col, row = self.tiles[index]
        return [col, row, self.tile, self.tile]

    def describe(self, index: int) -> str:
        return f"{self.scenes[self.tiles[index][0]]} window={self.window(index)}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        scene = self.tiles[index][0]
        pixels = read_window(self.scenes[scene], self.scene_bands[scene], self.window(index), self.scene_ranges[scene])
        return torch.from_numpy(pixels), -1


def _scaling(options: dict[str, str]) -> RasterScaling:
    percentiles = parse_float_list(options.pop("percentiles", "2,98"), what="percentiles")
    if len(percentiles) != 2:
        raise ValueError(f"percentiles: expected LOW,HIGH, got {percentiles}")
    return RasterScaling(scale=options.pop("scale", "percentile"), percentiles=(percentiles[0], percentiles[1]))


def _int_option(options: dict[str, str], key: str, default: int | None, spec: str) -> int | None:
    if key not in options:
        return default
    value = options.pop(key)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"dataset spec {spec!r}: {key} must be an integer, got {value!r}") from None


def sample_cache_dir() -> Path:
    """Where ``Sample:`` builds its images: $DINOV2_REPRO_CACHE, else ~/.cache/dinov2_repro."""
    return Path(os.environ.get("DINOV2_REPRO_CACHE") or Path.home() / ".cache" / "dinov2_repro")


def build_dataset(spec: str) -> Dataset:
    """Build a dataset from ``Name:key=value:...`` (see the module docstring for names and keys)."""
    name, options = parse_spec(spec)
    if name == "ImageFolder":
        if "root" not in options:
            raise ValueError(f"dataset spec {spec!r}: ImageFolder needs root=DIR")
        extensions = tuple(options.pop("extensions", ",".join(IMAGE_EXTENSIONS)).split(","))
        dataset: Dataset = ImageFolderDataset(root=options.pop("root"), extensions=extensions, labels=options.pop("labels", "none"))
    elif name == "Sample":
        tile = _int_option(options, "tile", 56, spec)
        root = Path(options.pop("root")) if "root" in options else sample_cache_dir() / f"sample_images_{tile}"
        from .sample_data import write_demo_image_folder

        dataset = ImageFolderDataset(root=write_demo_image_folder(root, tile=tile))
    elif name == "Manifest":
        if "path" not in options:
            raise ValueError(f"dataset spec {spec!r}: Manifest needs path=FILE")
        dataset = ManifestDataset(path=options.pop("path"), scaling=_scaling(options))
    elif name == "GeoTiff":
        if "root" not in options:
            raise ValueError(f"dataset spec {spec!r}: GeoTiff needs root=DIR")
        bands = _int_list(options.pop("bands"), what="bands") if "bands" in options else None
        dataset = GeoTiffDataset(
            root=options.pop("root"),
            bands=bands,
            tile=_int_option(options, "tile", 224, spec),
            stride=_int_option(options, "stride", None, spec),
            scaling=_scaling(options),
            max_nodata=float(options.pop("max_nodata", "0.5")),
        )
    else:
        raise ValueError(f"dataset spec {spec!r}: unknown dataset {name!r} (ImageFolder, Sample, Manifest, GeoTiff)")
    if options:
        raise ValueError(f"dataset spec {spec!r}: unknown keys {sorted(options)} for {name}")
    return dataset
