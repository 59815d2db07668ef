"""The manifest: the one format curation writes and training reads.

A manifest is JSON Lines (one object per line) or Parquet (needs pyarrow). Every row has a
non-empty ``path``; tiles add ``window`` = [col_off, row_off, width, height] and 1-based ``bands``
into the original GeoTIFF (no pixel copies), plus the remote-sensing metadata ``crs``,
``bounds``, ``scene_id``, ``gsd`` and a ``provenance`` record; labelled rows add ``label`` (an
int or a class name). Relative paths are relative to the manifest's own folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .files import atomic_output, atomic_write_text, json_default


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL or Parquet manifest; every row must be an object with a non-empty ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    if path.suffix == ".parquet":
        rows = _read_parquet(path)
        for row_no, row in enumerate(rows, 1):
            _check_row(row, f"manifest {path}, row {row_no}")
        return rows
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"manifest {path}:{line_no}: not valid JSON ({err})") from None
            _check_row(row, f"manifest {path}:{line_no}")
            rows.append(row)
    return rows


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict) or not row.get("path"):
        raise ValueError(f"{where}: each row must be an object with a non-empty 'path'")


def _import_parquet(path: Path):
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"manifest {path}: Parquet needs pyarrow (pip install pyarrow), or use JSONL") from None
    return pyarrow, pq


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    _, pq = _import_parquet(path)
    # A column holds a null where a row lacks the key; absent and null mean the same in a manifest.
    return [{k: v for k, v in row.items() if v is not None} for row in pq.read_table(path).to_pylist()]


def write_manifest(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write rows atomically as JSONL, or as Parquet when ``path`` ends in ``.parquet``."""
    path = Path(path)
    rows = list(rows)
    if path.suffix == ".parquet":
        pyarrow, pq = _import_parquet(path)
        # Round-trip through JSON so numpy scalars and paths become plain values pyarrow accepts;
        # one column per key of any row (rows lacking it get a null there).
        plain = json.loads(json.dumps(rows, default=json_default))
        keys = list(dict.fromkeys(key for row in plain for key in row))
        with atomic_output(path, suffix=".parquet") as tmp:
            pq.write_table(pyarrow.Table.from_pydict({key: [row.get(key) for row in plain] for key in keys}), tmp)
        return path
    text = "".join(json.dumps(row, sort_keys=True, default=json_default) + "\n" for row in rows)
    return atomic_write_text(path, text)


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
