"""What the ``embed`` verb embeds, as manifest rows: a folder of images, a manifest, GeoTIFF scenes.

Every input becomes rows of the project's manifest format (dinov2_repro/io/manifest.py), with
paths relative to the output folder when the files lie under it (else absolute):

- a folder image is one row (``path``, ``width``, ``height``); a raster file in it (``.tif`` ...)
  also gets ``window`` = the whole file, ``bands``, ``crs`` and ``bounds``;
- a manifest's rows are kept with all their keys, their paths re-based on the output folder;
- a GeoTIFF scene is cut into ``tile_size`` windows every ``stride`` pixels by the curation tile
  stage's own code, each row carrying ``window``, ``bands``, ``crs``, ``bounds`` (in that CRS),
  ``scene_id`` and ``gsd``.

A file that cannot be opened at all (a scene GDAL cannot read, an image PIL cannot identify)
yields no row: it is logged in one line naming it and returned in ``skipped_files``. Files that
open but fail when their pixels are decoded are found later, row by row (run.py).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from ..config import ConfigError
from ..io.files import GEOTIFF_SUFFIXES, RASTER_SUFFIXES, is_image_file
from ..io.manifest import portable_path, read_manifest, resolve_row_path
from ..io.raster import RasterReadError, check_bands, raster_read_guard, window_bounds

log = logging.getLogger("dinov2_repro.embed")


def unreadable_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this file cannot be read" (not "the command is wrong")."""
    errors: tuple[type[BaseException], ...] = (OSError, SyntaxError, RasterReadError)  # PIL: SyntaxError for some headers
    try:
        from rasterio.errors import RasterioError

        errors += (RasterioError,)
    except ImportError:
        pass
    return errors


def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def skip_file(path: str | os.PathLike, error: BaseException, skipped: list[dict]) -> None:
    """Log one line naming ``path`` and record it in ``skipped``."""
    log.warning("embed: skipping unreadable file %s: %s", path, describe_error(error))
    skipped.append({"file": str(path), "error": describe_error(error)})


def scene_files(scenes: Sequence[str | os.PathLike]) -> list[Path]:
    """The GeoTIFFs named by ``scenes``: files as given, folders as their .tif/.tiff files (sorted, recursive)."""
    files: list[Path] = []
    for item in scenes:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_image_file(p, tuple(s.lstrip(".") for s in GEOTIFF_SUFFIXES)))
            if not found:
                raise FileNotFoundError(f"--scenes {path}: no .tif/.tiff files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--scenes {path} does not exist")
    return files


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files of ``folder`` (the project's image extensions, sorted, recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"--images {folder} is not a folder")
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def _chosen_bands(path: Path, bands: Sequence[int] | None, count: int) -> list[int]:
    try:
        return check_bands(path, bands, count)
    except ValueError as error:
        raise ConfigError(f"--bands: {error}") from None


def _raster_file_row(path: Path, out_dir: Path, bands: Sequence[int] | None) -> dict:
    import rasterio

    with raster_read_guard(path), rasterio.open(path) as src:
        chosen = _chosen_bands(path, bands, src.count)
        crs = src.crs.to_string() if src.crs else None
        window = [0, 0, src.width, src.height]
        return {"path": portable_path(path, out_dir), "width": src.width, "height": src.height, "window": window,
                "bands": chosen, "crs": crs, "bounds": window_bounds(window, src.transform) if crs else None}


def folder_rows(folder: str | os.PathLike, out_dir: Path, *, bands: Sequence[int] | None,
                skipped: list[dict]) -> list[dict]:
    """One row per image file of ``folder``; unreadable ones go to ``skipped``."""
    from PIL import Image

    rows = []
    for path in image_files(folder):
        try:
            if path.suffix.lower() in RASTER_SUFFIXES:
                rows.append(_raster_file_row(path, out_dir, bands))
                continue
            with Image.open(path) as image:
                width, height = image.size
        except unreadable_errors() as error:
            skip_file(path, error, skipped)
            continue
        rows.append({"path": portable_path(path, out_dir), "width": width, "height": height})
    return rows


def manifest_rows(manifest: str | os.PathLike, out_dir: Path) -> list[dict]:
    """The manifest's rows, every key kept, paths re-based on ``out_dir``."""
    manifest = Path(manifest)
    rows = read_manifest(manifest)
    return [{**row, "path": portable_path(resolve_row_path(row, manifest.parent), out_dir)} for row in rows]


def scene_rows(scene: Path, out_dir: Path, *, tile_size: int, stride: int, bands: Sequence[int] | None,
               max_invalid_fraction: float, nodata: float | None, skipped: list[dict]) -> list[dict]:
    """The tiles of one GeoTIFF (the curation tile stage's grid and row keys); [] when unreadable."""
    import rasterio

    from ..curation.tiling import tile_scene

    try:
        with raster_read_guard(scene):
            with rasterio.open(scene) as src:
                chosen = _chosen_bands(scene, bands, src.count)
                if src.width < tile_size or src.height < tile_size:
                    log.warning("embed: scene %s (%dx%d px) is smaller than one %d px tile: no tiles",
                                scene, src.width, src.height, tile_size)
            rows, _ = tile_scene(scene, size=tile_size, stride=stride, bands=chosen,
                                 max_invalid_fraction=max_invalid_fraction, nodata=nodata, manifest_dir=out_dir)
    except unreadable_errors() as error:
        skip_file(scene, error, skipped)
        return []
    for row in rows:  # the tile stage's provenance names its own stage
        row["provenance"] = {"stage": "embed", "reason": row["provenance"]["reason"]}
    return rows


def list_rows(out_dir: Path, *, images: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None,
              scenes: Sequence[str | os.PathLike] = (), tile_size: int, stride: int, bands: Sequence[int] | None = None,
              max_invalid_fraction: float = 1.0, nodata: float | None = None) -> tuple[list[dict], list[dict]]:
    """(rows, skipped_files) of every input, in a fixed order: scenes, then the folder, then the manifest."""
    skipped: list[dict] = []
    rows: list[dict] = []
    for scene in scene_files(scenes):
        rows += scene_rows(scene, out_dir, tile_size=tile_size, stride=stride, bands=bands,
                           max_invalid_fraction=max_invalid_fraction, nodata=nodata, skipped=skipped)
    if images is not None:
        rows += folder_rows(images, out_dir, bands=bands, skipped=skipped)
    if manifest is not None:
        rows += manifest_rows(manifest, out_dir)
    return rows, skipped
