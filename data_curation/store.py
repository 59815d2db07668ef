"""Embeddings on disk, read through memory maps: the shard format every stage reads.

A folder of embeddings is ``index.json`` plus float16 ``.npy`` shards (docs/curation.md)::

    {"num_rows": N, "dim": D, "dtype": "float16",
     "shards": [{"file": "shard_00000.npy", "start": 0, "stop": 1024}, ...],
     "manifest": "...", "manifest_digest": "...", "skipped": [{"row": r, "path": ..., "error": ...}]}

Shard ``file`` (relative to the folder, or absolute) holds the rows ``start .. stop - 1`` of the
manifest, in order; the shards cover 0 .. N - 1 without gaps. ``manifest``, ``manifest_digest``
and ``skipped`` are optional. Rows are stored as the extractor made them; readers L2-normalise.
Nothing here reads a whole set into RAM unless asked to (``take`` of every row).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .io import read_json


class EmbeddingFormatError(ValueError):
    """An embeddings folder that does not follow the shard format (the message names file and key)."""


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class EmbeddingStore:
    """Row-addressable, memory-mapped view of an embeddings folder (L2-normalised float32 out)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.index = check_index(self.folder)
        self.dim = int(self.index["dim"])
        self._starts = np.array([s["start"] for s in self.index["shards"]], np.int64)
        self._maps = [np.load(shard_path(self.folder, s), mmap_mode="r") for s in self.index["shards"]]

    def __len__(self) -> int:
        return int(self.index["num_rows"])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop), L2-normalised float32 (only those rows are read)."""
        stop = min(stop, len(self))
        if stop <= start:
            return np.zeros((0, self.dim), np.float32)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts, at = [], start
        for shard in range(first, len(self._maps)):
            if at >= stop:
                break
            begin = int(self._starts[shard])
            block = self._maps[shard]
            parts.append(block[at - begin : min(stop - begin, len(block))])
            at = begin + len(block)
        return _normalise(np.concatenate(parts) if len(parts) > 1 else parts[0])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (any order), L2-normalised float32."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            out[where] = self._maps[shard][rows[where] - self._starts[shard]]
        return _normalise(out)

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows) blocks of ``size`` rows, in order."""
        for start in range(0, len(self), size):
            yield start, self.rows(start, start + size)


def shard_path(folder: Path, shard: dict) -> Path:
    return Path(folder) / shard["file"]  # an absolute "file" stays absolute


def check_index(folder: str | Path, *, num_rows: int | None = None) -> dict:
    """Read and validate ``folder/index.json`` against the shard format (headers only: the
    shards are memory-mapped, not read). ``num_rows``: the manifest's row count, when known."""
    folder = Path(folder)
    path = folder / "index.json"
    if not path.is_file():
        raise EmbeddingFormatError(f"{path}: missing (an embeddings folder needs index.json; see docs/curation.md)")
    index = read_json(path)
    for key in ("num_rows", "dim", "shards"):
        if key not in index:
            raise EmbeddingFormatError(f"{path}: key {key!r} missing")
    if num_rows is not None and int(index["num_rows"]) != num_rows:
        raise EmbeddingFormatError(f"{path}: num_rows={index['num_rows']} but the pool manifest has {num_rows} rows")
    expected = 0
    for i, shard in enumerate(index["shards"]):
        for key in ("file", "start", "stop"):
            if key not in shard:
                raise EmbeddingFormatError(f"{path}: shards[{i}] lacks {key!r}")
        if int(shard["start"]) != expected:
            raise EmbeddingFormatError(f"{path}: shards[{i}] starts at row {shard['start']}, expected {expected} "
                                       f"(shards must cover the rows in order, without gaps)")
        file = shard_path(folder, shard)
        if not file.is_file():
            raise EmbeddingFormatError(f"{path}: shards[{i}] file {file} does not exist")
        array = np.load(file, mmap_mode="r")
        if array.ndim != 2 or array.shape != (int(shard["stop"]) - int(shard["start"]), int(index["dim"])):
            raise EmbeddingFormatError(f"{file}: shape {array.shape}, index.json says "
                                       f"({int(shard['stop']) - int(shard['start'])}, {index['dim']})")
        if array.dtype not in (np.float16, np.float32):
            raise EmbeddingFormatError(f"{file}: dtype {array.dtype}; float16 (or float32) expected")
        expected = int(shard["stop"])
    if expected != int(index["num_rows"]):
        raise EmbeddingFormatError(f"{path}: shards cover {expected} rows, num_rows={index['num_rows']}")
    return index
