"""Training datasets built from reference-style strings ``Name:key=value:key=value``.

- ``ImageFolder:root=DIR[:extensions=jpg,png][:labels=subdirs|none]``: every image under DIR
  (recursive, sorted), read with PIL as RGB. Labels: index of the first-level subfolder
  (``labels=subdirs``) or -1 (default ``none``).
- ``Manifest:path=FILE.jsonl[:scale=...][:percentiles=2,98]``: the curation manifest
  (architecture.md). Rows with ``window`` or ``bands``, or a GeoTIFF path (.tif/.tiff/.vrt/.jp2), are
  read through rasterio; other rows with PIL. Relative paths are relative to the manifest's folder.
  ``label`` may be an int or a class name (names map to indices in sorted order); missing = -1.
  ``.parquet`` manifests need pyarrow.
- ``GeoTiff:root=DIR|FILE[:bands=1,2,3][:tile=224][:stride=224][:scale=...][:percentiles=2,98][:max_nodata=0.5]``:
  a grid of tiles over every GeoTIFF under root, read with windowed reads; tiles whose nodata
  fraction exceeds ``max_nodata`` are dropped. Label -1.

Raster items are float tensors (C, H, W) in [0, 1] for ANY band count, 3 included: raster bands
are not necessarily RGB, and keeping one item type per dataset keeps batches stackable.
PIL items are RGB images. DataAugmentationDINO accepts both.

Raster scaling (``scale``): ``percentile`` (default) maps each band's robust range, the
``percentiles`` of the scene's valid pixels computed once per scene (on a read decimated to at
most 1024 px per side), to [0, 1] and clips; ``LOW,HIGH`` uses one fixed range for all bands;
``L1,H1,L2,H2,...`` gives one range per selected band. Nodata pixels (the file's nodata value or
NaN) become 0 after scaling.

Unreadable files raise from ``__getitem__`` (the loader's wrapper skips and counts them); a missing
root or an empty dataset raises at construction, naming the path.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger("dinov2_repro.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2")
_STATS_MAX_SIDE = 1024


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


def _float_list(text: str, *, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def read_pil_rgb(path: str | os.PathLike) -> Image.Image:
    with Image.open(path) as image:
        image.load()  # decode now so a truncated file fails here, inside the caller's error handling
        return image.convert("RGB")


# --------------------------------------------------------------------------------------------- rasters
class RasterScaling:
    """How raster bands are mapped to [0, 1]: per-scene percentiles or fixed ranges."""

    def __init__(self, *, scale: str = "percentile", percentiles: tuple[float, float] = (2.0, 98.0)) -> None:
        self.percentiles = tuple(float(p) for p in percentiles)
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
        self.fixed: np.ndarray | None = None
        if scale != "percentile":
            values = _float_list(scale, what="scale")
            if len(values) < 2 or len(values) % 2:
                raise ValueError(f"scale: expected 'percentile', 'LOW,HIGH' or per-band pairs, got {scale!r}")
            self.fixed = np.asarray(values, dtype=np.float64).reshape(-1, 2)
            if np.any(self.fixed[:, 1] <= self.fixed[:, 0]):
                raise ValueError(f"scale: every HIGH must exceed its LOW, got {scale!r}")

    def ranges(self, path: str, bands: list[int], decimated: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """(len(bands), 2) array of [low, high] per band; ``decimated`` reuses a read_decimated result."""
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


def _valid_mask(data: np.ndarray, nodatavals: tuple, bands: list[int]) -> np.ndarray:
    valid = np.isfinite(data)
    for b, band in enumerate(bands):
        nodata = nodatavals[band - 1]
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            valid[b] &= data[b] != nodata
    return valid


def read_decimated(path: str, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A read of the whole scene shrunk to at most 1024 px per side (for statistics): (data, valid)."""
    import rasterio

    with rasterio.open(path) as src:
        factor = max(1, math.ceil(max(src.height, src.width) / _STATS_MAX_SIDE))
        shape = (len(bands), math.ceil(src.height / factor), math.ceil(src.width / factor))
        data = src.read(bands, out_shape=shape).astype(np.float64)
        return data, _valid_mask(data, src.nodatavals, bands)


def read_raster(path: str, bands: list[int] | None, window: list[int] | None, ranges: np.ndarray) -> torch.Tensor:
    """Windowed read ([col_off, row_off, width, height]) scaled to a float (C, H, W) tensor in [0, 1]."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as src:
        bands = bands or list(range(1, src.count + 1))
        win = Window(*window) if window is not None else None
        inside = win is None or (win.col_off >= 0 and win.row_off >= 0 and win.col_off + win.width <= src.width and win.row_off + win.height <= src.height)
        data = src.read(bands, window=win, boundless=not inside, masked=False).astype(np.float64)
        valid = _valid_mask(data, src.nodatavals, bands)
        if not inside:
            # Pixels outside the scene are nodata even when the file declares no nodata value.
            outside = src.read_masks(bands, window=win, boundless=True) == 0
            valid &= ~outside
    low, high = ranges[:, 0, None, None], ranges[:, 1, None, None]
    scaled = np.clip((data - low) / (high - low), 0.0, 1.0)
    scaled[~valid] = 0.0
    return torch.from_numpy(scaled.astype(np.float32))


def _raster_band_count(path: str) -> int:
    import rasterio

    with rasterio.open(path) as src:
        return src.count


def _check_bands(path: str, bands: list[int] | None, count: int) -> list[int]:
    if bands is None:
        return list(range(1, count + 1))
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise ValueError(f"bands={bands}: {path} has {count} bands (1-based indexes), invalid: {bad}")
    return list(bands)


# --------------------------------------------------------------------------------------------- datasets
class ImageFolderDataset(Dataset):
    def __init__(self, *, root: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, labels: str = "none") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: root {self.root} does not exist or is not a folder")
        if labels not in ("none", "subdirs"):
            raise ValueError(f"ImageFolder: labels must be 'none' or 'subdirs', got {labels!r}")
        suffixes = {"." + e.lower().lstrip(".") for e in extensions}
        files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(Path(dirpath) / f for f in sorted(filenames) if Path(f).suffix.lower() in suffixes and not f.startswith("."))
        if not files:
            raise ValueError(f"ImageFolder: no images with extensions {sorted(suffixes)} under {self.root}")
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


def _read_manifest_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"Manifest {path}: reading Parquet needs pyarrow (pip install pyarrow), or use JSONL") from None
        return pq.read_table(path).to_pylist()
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"Manifest {path}:{line_number}: invalid JSON ({error})") from None
            if not isinstance(row, dict) or not row.get("path"):
                raise ValueError(f"Manifest {path}:{line_number}: each row needs a non-empty 'path'")
            rows.append(row)
    return rows


class ManifestDataset(Dataset):
    def __init__(self, *, path: str | os.PathLike, scaling: RasterScaling | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Manifest: file {self.path} does not exist")
        rows = _read_manifest_rows(self.path)
        if not rows:
            raise ValueError(f"Manifest {self.path} has no rows")
        base = self.path.parent
        self.rows = rows
        self.paths = [str(p if Path(p).is_absolute() else base / p) for p in (r["path"] for r in rows)]
        self.scaling = scaling or RasterScaling()
        self._ranges: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}  # per-process cache: one stats read per scene
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
        row = self.rows[index]
        return "window" in row or "bands" in row or Path(self.paths[index]).suffix.lower() in RASTER_SUFFIXES

    def describe(self, index: int) -> str:
        window = self.rows[index].get("window")
        return self.paths[index] + (f" window={window}" if window is not None else "")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, row = self.paths[index], self.rows[index]
        if not self.is_raster(index):
            return read_pil_rgb(path), self.labels[index]
        bands = _check_bands(path, row.get("bands"), _raster_band_count(path))
        key = (path, tuple(bands))
        if key not in self._ranges:
            self._ranges[key] = self.scaling.ranges(path, bands)
        return read_raster(path, bands, row.get("window"), self._ranges[key]), self.labels[index]


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
        scenes = [self.root] if self.root.is_file() else sorted(p for p in self.root.rglob("*") if p.suffix.lower() in (".tif", ".tiff"))
        if not scenes:
            raise ValueError(f"GeoTiff: no .tif/.tiff files under {self.root}")
        self.scenes: list[str] = []
        self.scene_bands: list[list[int]] = []
        self.scene_ranges: list[np.ndarray] = []
        self.bad_files: list[str] = []
        self.tiles: list[tuple[int, int, int]] = []  # (scene, col_off, row_off)
        band_count = None
        for scene in scenes:
            try:
                count = _raster_band_count(str(scene))
            except Exception as error:  # unreadable scene: skip it, the run goes on
                logger.warning("GeoTiff: skipping unreadable scene %s (%s)", scene, error)
                self.bad_files.append(str(scene))
                continue
            scene_bands = _check_bands(str(scene), bands, count)
            if band_count is not None and len(scene_bands) != band_count:
                raise ValueError(f"GeoTiff: {scene} gives {len(scene_bands)} bands, earlier scenes {band_count}; pass bands=...")
            band_count = len(scene_bands)
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
        for row in range(0, height - self.tile + 1, self.stride):
            for col in range(0, width - self.tile + 1, self.stride):
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
        return read_raster(self.scenes[scene], self.scene_bands[scene], self.window(index), self.scene_ranges[scene]), -1


def _scaling(options: dict[str, str]) -> RasterScaling:
    percentiles = _float_list(options.pop("percentiles", "2,98"), what="percentiles")
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


def build_dataset(spec: str) -> Dataset:
    """Build a dataset from ``Name:key=value:...`` (see the module docstring for names and keys)."""
    name, options = parse_spec(spec)
    if name == "ImageFolder":
        if "root" not in options:
            raise ValueError(f"dataset spec {spec!r}: ImageFolder needs root=DIR")
        extensions = tuple(options.pop("extensions", ",".join(IMAGE_EXTENSIONS)).split(","))
        dataset: Dataset = ImageFolderDataset(root=options.pop("root"), extensions=extensions, labels=options.pop("labels", "none"))
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
        raise ValueError(f"dataset spec {spec!r}: unknown dataset {name!r} (ImageFolder, Manifest, GeoTiff)")
    if options:
        raise ValueError(f"dataset spec {spec!r}: unknown keys {sorted(options)} for {name}")
    return dataset
