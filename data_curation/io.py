"""Atomic file writes and the JSONL manifest format shared by every curation stage.

A manifest row is a dict with at least ``path``; tiles add ``window`` = [col_off, row_off,
width, height] and 1-based ``bands`` into the original GeoTIFF (no pixel copies), plus the
remote-sensing metadata ``crs``, ``bounds``, ``scene_id``, ``gsd`` and a ``provenance`` record.
Relative paths are relative to the manifest's own directory.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same directory, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def write_manifest(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    text = "".join(json.dumps(row, sort_keys=True, default=_json_default) + "\n" for row in rows)
    return atomic_write_text(path, text)


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL manifest; every row must be an object with a ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    rows = []
    with open(path) as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"manifest {path}, line {line_no}: not valid JSON: {err}") from err
            if not isinstance(row, dict) or "path" not in row:
                raise ValueError(f"manifest {path}, line {line_no}: each row must be an object with a 'path' key")
            rows.append(row)
    return rows


def resolve_row_path(row: dict, manifest_dir: str | os.PathLike) -> Path:
    """A row's image path, with relative paths taken relative to the manifest's directory."""
    path = Path(row["path"])
    return path if path.is_absolute() else Path(manifest_dir) / path


def portable_path(path: str | os.PathLike, manifest_dir: str | os.PathLike) -> str:
    """Relative to ``manifest_dir`` when the file lies under it (the tree can move), else absolute."""
    path = Path(path).resolve()
    base = Path(manifest_dir).resolve()
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


PACKAGE_SCHEME = "pkg://"


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
