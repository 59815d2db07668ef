"""The ``tile`` stage: GeoTIFF scenes -> windows referenced in a pool manifest (no pixel copies).

One shard per scene (``pool/tiles/<scene_id>.jsonl``) is written atomically and skipped when it
exists, so a killed run resumes scene by scene; the pool manifest is their concatenation.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from dinov2_repro.io.files import atomic_write_json, is_image_file
from dinov2_repro.io.manifest import portable_path, read_manifest, write_manifest
from dinov2_repro.io.raster import check_bands, tile_windows, window_bounds

log = logging.getLogger(__name__)


def invalid_fraction(pixels: np.ndarray, nodata: float | None, mask: np.ndarray | None = None) -> float:
    """Fraction of pixels where any band is nodata / not finite / masked out (``mask`` 0)."""
    bad = ~np.isfinite(pixels).all(axis=0)
    if nodata is not None and not np.isnan(nodata):
        bad |= (pixels == nodata).any(axis=0)
    if mask is not None:
        bad |= (mask == 0).any(axis=0)
    return float(bad.mean())


def scene_id_of(path: Path) -> str:
    return path.stem


def tile_scene(
    scene: str | Path,
    *,
    size: int,
    stride: int,
    bands: Sequence[int] | None,
    max_invalid_fraction: float,
    nodata: float | None,
    manifest_dir: str | Path,
) -> tuple[list[dict], dict]:
    """Manifest rows of the valid tiles of one scene, and counts for the report."""
    import rasterio
    from rasterio.windows import Window

    scene = Path(scene)
    if not scene.is_file():
        raise FileNotFoundError(f"tile.scenes: scene {scene} does not exist")
    with rasterio.open(scene) as src:
        try:
            band_list = check_bands(scene, bands or None, src.count)
        except ValueError as err:
            raise ValueError(f"tile.bands: {err}") from None
        scene_nodata = nodata if nodata is not None else src.nodata
        crs = src.crs.to_string() if src.crs else None
        gsd = float(abs(src.transform.a)) if src.transform else None
        rows, dropped = [], 0
        strip_row, strip, strip_mask = None, None, None
        for window in tile_windows(src.width, src.height, size, stride):
            col, row, w, h = window
            if row != strip_row:
                # One read per strip of tile rows: memory stays bands x size x width, not the whole scene.
                strip_window = Window(0, row, src.width, h)
                strip = src.read(band_list, window=strip_window)
                strip_mask = src.read_masks(band_list, window=strip_window)
                strip_row = row
            frac = invalid_fraction(strip[:, :, col : col + w], scene_nodata, strip_mask[:, :, col : col + w])
            if frac > max_invalid_fraction:
                dropped += 1
                continue
            entry = {
                "path": portable_path(scene, manifest_dir),
                "window": list(window),
                "bands": [int(b) for b in band_list],
                "scene_id": scene_id_of(scene),
                "crs": crs,
                "bounds": window_bounds(window, src.transform) if crs else None,
                "gsd": gsd,
                "width": w,
                "height": h,
                "invalid_fraction": round(frac, 6),
                "provenance": {"stage": "tile", "reason": f"invalid fraction {frac:.3f} <= {max_invalid_fraction}"},
            }
            rows.append(entry)
    return rows, {"scene": str(scene), "tiles": len(rows), "dropped_invalid": dropped}


def image_rows(folder: str | Path, manifest_dir: str | Path) -> list[dict]:
    """Whole images of a folder (sorted, recursive) as manifest rows with their size."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pool.folders: {folder} is not a directory")
    rows = []
    for path in sorted(p for p in folder.rglob("*") if is_image_file(p)):
        with Image.open(path) as image:
            width, height = image.size
        rows.append({
            "path": portable_path(path, manifest_dir), "width": width, "height": height,
            "provenance": {"stage": "tile", "reason": f"image file in {folder}"},
        })
    return rows


def bands_per_scene(bands: Sequence | None, n_scenes: int) -> list[list[int] | None]:
    """``tile.bands``: null (all bands), one list for every scene, or one list per scene (sensors
    with different band orders, e.g. Landsat [3, 2, 1] beside an RGB scene [1, 2, 3])."""
    if not bands:
        return [None] * n_scenes
    if all(isinstance(b, int) for b in bands):
        return [list(bands)] * n_scenes
    if len(bands) != n_scenes or not all(isinstance(b, (list, tuple)) for b in bands):
        raise ValueError(f"tile.bands: give one list of 1-based bands for all scenes, or one list per scene "
                         f"({n_scenes} scenes), got {list(bands)}")
    return [list(b) for b in bands]


def run_tile(*, scenes: Sequence[str], folders: Sequence[str], size: int, stride: int, bands: Sequence | None,
             max_invalid_fraction: float, nodata: float | None, pool_dir: str | Path) -> Path:
    """Tile every scene (resumable per scene), add folder images, write ``pool/manifest.jsonl``."""
    pool_dir = Path(pool_dir)
    shard_dir = pool_dir / "tiles"
    ids = [scene_id_of(Path(s)) for s in scenes]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"tile.scenes: several scenes share the scene id(s) {sorted(duplicates)} (file stem); rename them")
    rows, stats = [], []
    for scene, scene_id, scene_bands in zip(scenes, ids, bands_per_scene(bands, len(scenes))):
        shard = shard_dir / f"{scene_id}.jsonl"
        if shard.is_file():
            log.info("tile: %s already done, skipped", scene_id)
            scene_rows = read_manifest(shard)
            stats.append({"scene": str(scene), "tiles": len(scene_rows), "resumed": True})
        else:
            scene_rows, scene_stats = tile_scene(scene, size=size, stride=stride, bands=scene_bands,
                                                 max_invalid_fraction=max_invalid_fraction, nodata=nodata,
                                                 manifest_dir=pool_dir)
            write_manifest(shard, scene_rows)
            stats.append(scene_stats)
        rows.extend(scene_rows)
    for folder in folders:
        rows.extend(image_rows(folder, pool_dir))
    if not rows:
        raise ValueError("tile: the pool is empty (no valid tiles in tile.scenes and no images in pool.folders)")
    atomic_write_json(pool_dir / "tile_stats.json", stats)
    return write_manifest(pool_dir / "manifest.jsonl", rows)
