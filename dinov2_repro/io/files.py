"""Atomic file writes, JSON reading, the image-extension list and package-resource paths.

Every file the project writes goes through :func:`atomic_output` (directly or through the
``atomic_*`` helpers): the data goes to a hidden temp file in the target's folder, then one
``os.replace`` puts it in place, so a reader or a resumed run never sees half a file.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# Image files the folder readers pick up (lower case, no dot). One list for every stage.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")
# Suffixes read through rasterio (georeferenced rasters, any band count) rather than PIL.
RASTER_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".vrt", ".jp2")
# Scene files a GeoTIFF folder scan picks up.
GEOTIFF_SUFFIXES: tuple[str, ...] = (".tif", ".tiff")

PACKAGE_SCHEME = "pkg://"


def is_image_file(path: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """True for a visible file whose suffix is one of ``extensions`` (case-insensitive)."""
    path = Path(path)
    suffixes = {"." + e.lower().lstrip(".") for e in extensions}
    return path.suffix.lower() in suffixes and not path.name.startswith(".")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on error it is removed.

    ``suffix`` lets writers that pick the format from the file name (rasterio, PIL) see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced before the rename); returns the path."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_default(value: Any) -> Any:
    """``json.dumps`` fallback for numpy scalars/arrays and paths."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=json_default) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def resolve_resource(path: str | os.PathLike) -> Path:
    """``pkg://<package>/<relative path>`` -> the file shipped inside an installed package (found
    without importing it: data-only packages are installed without their dependencies); other
    paths are returned unchanged."""
    text = str(path)
    if not text.startswith(PACKAGE_SCHEME):
        return Path(text)
    import importlib.util

    package, _, relative = text[len(PACKAGE_SCHEME):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{text}: package {package!r} is not installed")
    return Path(spec.submodule_search_locations[0]) / relative
