"""The ``tile`` stage: GeoTIFF scenes -> windows referenced in a pool manifest (no pixel copies).

One shard per scene (``pool/tiles/<scene_id>.jsonl``) is written atomically and skipped when it
exists, so a killed run resumes scene by scene; the pool manifest is their concatenation.

An unreadable scene (GDAL cannot open or read it, e.g. truncated) or folder image (PIL cannot
identify it) is skipped: logged with its path, listed in ``tile_stats.json`` (``skipped`` and
``error``), and retried by the next run (no shard is written for it). Nothing readable at all is
an error naming the first bad file.
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


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this file cannot be read" (not "the config is wrong")."""
    errors: tuple[type[BaseException], ...] = (OSError, SyntaxError)  # PIL raises SyntaxError for some broken headers
    try:
        from rasterio.errors import RasterioError

        errors += (RasterioError,)
    except ImportError:
        pass
    return errors


def image_rows(folder: str | Path, manifest_dir: str | Path, skipped: list[dict] | None = None) -> list[dict]:
    """Whole images of a folder (sorted, recursive) as manifest rows with their size. Unreadable
    ones are logged and appended to ``skipped`` ({"image", "error"}) instead of raising."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pool.folders: {folder} is not a directory")
    rows = []
    for path in sorted(p for p in folder.rglob("*") if is_image_file(p)):
        try:
            with Image.open(path) as image:
                width, height = image.size
        except _unreadable_errors() as error:
            log.warning("tile: skipping unreadable image %s: %s: %s", path, type(error).__name__, error)
            if skipped is not None:
                skipped.append({"image": str(path), "skipped": True, "error": f"{type(error).__name__}: {error}"})
            continue
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
             max_invalid_fraction: float, nodata: float | None, pool_dir: str | Path,
             only: Sequence[int] | None = None) -> Path | None:
    """Tile every scene (resumable per scene), add folder images, write ``pool/manifest.jsonl``.
    ``only``: tile just these scene indexes (one shard of the tile stage) and write no manifest."""
    pool_dir = Path(pool_dir)
    shard_dir = pool_dir / "tiles"
    ids = [scene_id_of(Path(s)) for s in scenes]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"tile.scenes: several scenes share the scene id(s) {sorted(duplicates)} (file stem); rename them")
    rows, stats = [], []
    for number, (scene, scene_id, scene_bands) in enumerate(zip(scenes, ids, bands_per_scene(bands, len(scenes)))):
        if only is not None and number not in only:
            continue
        shard = shard_dir / f"{scene_id}.jsonl"
        if shard.is_file():
            log.info("tile: %s already done, skipped", scene_id)
            scene_rows = read_manifest(shard)
            stats.append({"scene": str(scene), "tiles": len(scene_rows), "resumed": True})
        else:
            try:
                scene_rows, scene_stats = tile_scene(scene, size=size, stride=stride, bands=scene_bands,
                                                     max_invalid_fraction=max_invalid_fraction, nodata=nodata,
                                                     manifest_dir=pool_dir)
            except FileNotFoundError:
                raise  # a scene named in the config that does not exist is a config mistake
            except _unreadable_errors() as error:
                # GDAL's own message often lacks the file name: this line carries it.
                log.warning("tile: skipping unreadable scene %s: %s: %s", scene, type(error).__name__, error)
                stats.append({"scene": str(scene), "tiles": 0, "skipped": True, "error": f"{type(error).__name__}: {error}"})
                continue
            write_manifest(shard, scene_rows)
            stats.append(scene_stats)
        rows.extend(scene_rows)
    if only is not None:
        return None
    for folder in folders:
        rows.extend(image_rows(folder, pool_dir, skipped=stats))
    skipped = [s for s in stats if s.get("skipped")]
    if not rows:
        cause = (f"all {len(skipped)} input file(s) are unreadable (first: {skipped[0].get('scene') or skipped[0].get('image')}: "
                 f"{skipped[0]['error']})" if skipped else "no valid tiles in tile.scenes and no images in pool.folders")
        raise ValueError(f"tile: the pool is empty: {cause}")
    if skipped:
        log.warning("tile: skipped %d unreadable file(s), listed in %s", len(skipped), pool_dir / "tile_stats.json")
    atomic_write_json(pool_dir / "tile_stats.json", stats)
    return write_manifest(pool_dir / "manifest.jsonl", rows)
