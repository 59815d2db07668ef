"""Image + mask pairs for segmentation: discovery, georeferenced alignment, class mapping,
tiling and spatially disjoint splits. All raster reading of the segmentation stage is here.

Conventions (README "Evaluating on your satellite data"):
- folder: ``ROOT/images/<stem>.{png,tif,...}`` with ``ROOT/masks/<stem>.{png,tif}``; or
  ``ROOT/{train,val,test}/{images,masks}/`` to fix the split yourself;
- manifest (JSONL or Parquet): rows with ``path`` and ``mask`` (and optional ``split``);
- ``landsat``: the shipped Landsat-7 scene (6 bands) with its 7-class strata map.
Mask pixel values are class codes (``--classes`` lists them in order); the ignore index and the
mask's and image's nodata are excluded. Scenes without an explicit split are cut into blocks of
whole tiles, and blocks (never single tiles) are dealt to train / val / test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ...config import ConfigError
from ...io import raster
from ...io.files import IMAGE_EXTENSIONS, RASTER_SUFFIXES

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class PairSource:
    image: Path
    mask: Path
    split: str | None = None


@dataclass
class Scene:
    """One image + mask read into memory: image (C, H, W) float32 in [0, 1], labels (H, W) int64
    class indices with ``ignore_index`` where not usable."""

    source: PairSource
    image: np.ndarray
    labels: np.ndarray
    ranges: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True)
class Tile:
    scene: int
    row: int
    col: int
    split: str


# ---------------------------------------------------------------------------------- discovery
def _pairs_in(folder: Path, split: str | None) -> list[PairSource]:
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise ConfigError(f"{folder}: expected subfolders images/ and masks/ (same file stems)")
    masks = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs = []
    for image in sorted(images_dir.iterdir()):
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if image.stem not in masks:
            raise ConfigError(f"{image}: no mask named {image.stem}.* in {masks_dir}")
        pairs.append(PairSource(image, masks[image.stem], split))
    return pairs


def _manifest_pairs(path: Path) -> list[PairSource]:
    """Rows with ``path`` and ``mask`` (relative paths: to the manifest's folder) and an optional ``split``."""
    from ...io.manifest import read_manifest, resolve_row_path

    pairs = []
    for number, row in enumerate(read_manifest(path), start=1):
        if not row.get("mask"):
            raise ConfigError(f"manifest {path}: row {number} has no 'mask' (keys: {sorted(row)})")
        split = row.get("split")
        if split is not None and split not in SPLITS:
            raise ConfigError(f"manifest {path}: row {number} has split={split!r}; use one of {', '.join(SPLITS)}")
        mask = resolve_row_path({"path": row["mask"]}, path.parent)
        pairs.append(PairSource(resolve_row_path(row, path.parent), mask, split))
    return pairs


def landsat_example(workdir: Path) -> list[PairSource]:
    """The shipped Landsat-7 scene as one 6-band GeoTIFF (written once under ``workdir``) + strata.tif."""
    from ...data.sample_data import strata_path, write_landsat_stack

    stack = workdir / "landsat_6band.tif"
    if not stack.is_file():
        write_landsat_stack(stack)
    return [PairSource(stack, strata_path())]


def discover_pairs(spec: str, *, workdir: Path) -> list[PairSource]:
    """Pairs from a folder, a manifest file or ``landsat``; errors name the path."""
    if spec == "landsat":
        return landsat_example(workdir)
    path = Path(spec)
    if path.is_file():
        pairs = _manifest_pairs(path)
    elif path.is_dir():
        split_dirs = [path / s for s in SPLITS if (path / s).is_dir()]
        pairs = [p for d in split_dirs for p in _pairs_in(d, d.name)] if split_dirs else _pairs_in(path, None)
    else:
        raise ConfigError(f"--data {spec}: not a folder, a manifest file or 'landsat'")
    if not pairs:
        raise ConfigError(f"--data {spec}: no image/mask pairs found")
    for pair in pairs:
        for p in (pair.image, pair.mask):
            if not p.is_file():
                raise ConfigError(f"--data {spec}: file {p} does not exist")
    return pairs


# ---------------------------------------------------------------------------------- reading
def is_raster(path: Path) -> bool:
    return path.suffix.lower() in RASTER_SUFFIXES


def band_count(path: Path) -> int:
    if is_raster(path):
        return raster.band_count(path)
    from PIL import Image

    with Image.open(path) as image:
        return len(image.getbands())


def check_bands(path: Path, bands: Sequence[int] | None) -> list[int]:
    return raster.check_bands(path, bands, band_count(path))


def raster_valid(path: Path, bands: Sequence[int], window: Sequence[int] | None = None) -> np.ndarray:
    """(H, W) bool: pixels valid in every band (nodata, NaN, the file's mask and the outside of the
    scene for an overhanging ``[col_off, row_off, width, height]`` window are not)."""
    import rasterio
    from rasterio.windows import Window

    with raster.raster_read_guard(path, window), rasterio.open(path) as src:
        col, row, width, height = window if window is not None else (0, 0, src.width, src.height)
        valid = np.zeros((height, width), dtype=bool)
        c0, r0, c1, r1 = max(col, 0), max(row, 0), min(col + width, src.width), min(row + height, src.height)
        if c1 > c0 and r1 > r0:
            inside = Window(c0, r0, c1 - c0, r1 - r0)
            data = src.read(list(bands), window=inside).astype(np.float64)
            masks = src.read_masks(list(bands), window=inside)
            valid[r0 - row:r1 - row, c0 - col:c1 - col] = raster.valid_mask(data, src.nodatavals, bands, masks).all(axis=0)
    return valid


def read_image(path: Path, bands: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
    """(C, H, W) float32 in [0, 1], (H, W) bool valid, per-band ranges used (rasters: 2-98 percentiles)."""
    chosen = check_bands(path, bands)
    if is_raster(path):  # the project's one pixel-scaling policy (per-scene percentiles, nodata 0)
        ranges = raster.RasterScaling().ranges(path, chosen)
        return raster.read_window(path, chosen, None, ranges), raster_valid(path, chosen), ranges.tolist()
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image)
    array = array[..., None] if array.ndim == 2 else array
    data = np.transpose(array[..., [b - 1 for b in chosen]], (2, 0, 1)).astype(np.float32) / 255.0
    return data, np.ones(data.shape[1:], dtype=bool), [[0.0, 255.0]] * len(chosen)


def read_mask(pair: PairSource, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Mask values (H, W) int64 on the image's grid and a bool array of mask-nodata pixels.
    Two GeoTIFFs are aligned by georeference (same CRS required); otherwise sizes must match."""
    if is_raster(pair.image) and is_raster(pair.mask):
        import rasterio

        with raster.raster_read_guard(pair.mask), rasterio.open(pair.image) as img, rasterio.open(pair.mask) as msk:
            if img.crs is not None and msk.crs is not None:
                if img.crs != msk.crs:
                    raise ConfigError(f"mask {pair.mask} has CRS {msk.crs}, its image {pair.image} has {img.crs}")
                return _mask_on_grid(msk, img, shape, pair.mask)
    if is_raster(pair.mask):
        import rasterio

        with raster.raster_read_guard(pair.mask), rasterio.open(pair.mask) as msk:
            values, nodata = msk.read(1), msk.nodata
    else:
        from PIL import Image

        with Image.open(pair.mask) as image:
            values, nodata = np.asarray(image), None
    if values.ndim != 2:
        raise ConfigError(f"mask {pair.mask} must have one band, has shape {values.shape}")
    if values.shape != tuple(shape):
        raise ConfigError(f"mask {pair.mask} is {values.shape[1]}x{values.shape[0]} px, its image {pair.image} is "
                          f"{shape[1]}x{shape[0]} px (and they are not both georeferenced GeoTIFFs)")
    return _mask_values(values, nodata, np.zeros(shape, dtype=bool), pair.mask)


def _mask_on_grid(msk, img, shape: tuple[int, int], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The mask resampled (nearest) onto the image's pixel grid through both geotransforms; image
    pixels outside the mask's extent are missing. Written with ``@`` (rasterio's window helpers
    still use affine's deprecated ``*``)."""
    height, width = shape
    rows, cols = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    xs, ys = img.transform @ (cols.ravel(), rows.ravel())  # pixel centres in the shared CRS
    mask_cols, mask_rows = ~msk.transform @ (xs, ys)
    mask_rows, mask_cols = np.floor(mask_rows).astype(np.int64), np.floor(mask_cols).astype(np.int64)
    inside = (mask_rows >= 0) & (mask_rows < msk.height) & (mask_cols >= 0) & (mask_cols < msk.width)
    values = np.zeros(height * width, dtype=np.float64)
    outside = ~inside
    if inside.any():
        r0, r1 = mask_rows[inside].min(), mask_rows[inside].max() + 1
        c0, c1 = mask_cols[inside].min(), mask_cols[inside].max() + 1
        from rasterio.windows import Window

        block = msk.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
        flags = msk.read_masks(1, window=Window(c0, r0, c1 - c0, r1 - r0))
        values[inside] = block[mask_rows[inside] - r0, mask_cols[inside] - c0]
        outside[inside] = flags[mask_rows[inside] - r0, mask_cols[inside] - c0] == 0
    return _mask_values(values.reshape(shape), msk.nodata, outside.reshape(shape), path)


def _mask_values(values: np.ndarray, nodata: float | None, outside: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64)
    missing = outside | ~np.isfinite(values)
    if nodata is not None and np.isfinite(nodata):
        missing |= values == nodata
    if np.any(values[~missing] != np.round(values[~missing])):
        raise ConfigError(f"mask {path} holds non-integer values; masks hold integer class codes")
    return np.where(missing, -1, values).astype(np.int64), missing


def labels_from_codes(codes: np.ndarray, missing: np.ndarray, *, class_values: Sequence[int], ignore_index: int,
                      path: Path) -> np.ndarray:
    """Mask codes -> class indices (position in ``class_values``); ignore / nodata -> ignore_index.
    A code that is neither a class nor the ignore index is an error naming the file and value."""
    lookup = {int(v): i for i, v in enumerate(class_values)}
    labels = np.full(codes.shape, ignore_index, dtype=np.int64)
    usable = ~missing & (codes != ignore_index)
    unknown = sorted(set(np.unique(codes[usable]).tolist()) - set(lookup))
    if unknown:
        raise ConfigError(f"mask {path}: class value {unknown[0]} is not one of --classes {','.join(map(str, class_values))}"
                          f" (nor the ignore index {ignore_index}); values found: {unknown[:10]}")
    for code, index in lookup.items():
        labels[usable & (codes == code)] = index
    return labels


def mask_codes_present(pairs: Sequence[PairSource], *, ignore_index: int) -> list[int]:
    """Sorted class codes found in the masks (for data given without --classes)."""
    found: set[int] = set()
    for pair in pairs:
        shape = _image_shape(pair.image)
        codes, missing = read_mask(pair, shape)
        found |= set(np.unique(codes[~missing & (codes != ignore_index)]).tolist())
    return sorted(found)


def _image_shape(path: Path) -> tuple[int, int]:
    if is_raster(path):
        import rasterio

        with rasterio.open(path) as src:
            return src.height, src.width
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def load_scene(pair: PairSource, *, bands: Sequence[int] | None, class_values: Sequence[int], ignore_index: int) -> Scene:
    image, valid, ranges = read_image(pair.image, bands)
    codes, missing = read_mask(pair, image.shape[1:])
    labels = labels_from_codes(codes, missing, class_values=class_values, ignore_index=ignore_index, path=pair.mask)
    labels[~valid] = ignore_index  # the image's nodata is excluded from loss and metrics
    return Scene(pair, image, labels, ranges)


# ---------------------------------------------------------------------------------- tiling and splits
def spatial_tiles(scenes: Sequence[Scene], *, tile: int, ignore_index: int, block_tiles: int = 2,
                  fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0,
                  min_labelled: float = 0.5) -> dict[str, list[Tile]]:
    """Non-overlapping tiles with at least ``min_labelled`` labelled pixels. Scenes without a split
    are cut into blocks of ``block_tiles`` x ``block_tiles`` tiles dealt to train/val/test in a
    seeded order with the given fractions, so neighbouring tiles never cross splits."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Tile]] = {s: [] for s in SPLITS}
    for index, scene in enumerate(scenes):
        height, width = scene.labels.shape
        positions = [(r, c) for r in range(0, height - tile + 1, tile) for c in range(0, width - tile + 1, tile)
                     if (scene.labels[r:r + tile, c:c + tile] != ignore_index).mean() >= min_labelled]
        if scene.source.split is not None:
            out[scene.source.split] += [Tile(index, r, c, scene.source.split) for r, c in positions]
            continue
        span = tile * block_tiles
        blocks = sorted({(r // span, c // span) for r, c in positions})
        order = rng.permutation(len(blocks))
        cut1 = max(1, round(fractions[0] * len(blocks)))
        cut2 = max(cut1 + 1, round((fractions[0] + fractions[1]) * len(blocks)))
        split_of = {blocks[k]: ("train" if rank < cut1 else "val" if rank < cut2 else "test") for rank, k in enumerate(order)}
        for r, c in positions:
            split = split_of[(r // span, c // span)]
            out[split].append(Tile(index, r, c, split))
    return out


def check_splits(tiles: dict[str, list[Tile]], *, data: str, tile: int) -> None:
    for split in SPLITS:
        if not tiles[split]:
            raise ConfigError(f"--data {data}: split {split!r} has no {tile}x{tile} px tiles with enough labelled pixels "
                              f"(smaller --tile, more data, or an explicit {split}/ folder)")


def tile_arrays(scenes: Sequence[Scene], tiles: Sequence[Tile], *, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, T, T) float32 images and (N, T, T) int64 labels of the given tiles."""
    images = np.stack([scenes[t.scene].image[:, t.row:t.row + tile, t.col:t.col + tile] for t in tiles])
    labels = np.stack([scenes[t.scene].labels[t.row:t.row + tile, t.col:t.col + tile] for t in tiles])
    return images, labels

