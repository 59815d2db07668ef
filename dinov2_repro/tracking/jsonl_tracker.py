"""The always-on tracker: ``metrics.jsonl`` in the run directory, one JSON object per logged step."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io.files import atomic_write_text


def drop_rows_after(path: str | os.PathLike, iteration: int) -> int:
    """Remove the rows of ``path`` logged after ``iteration`` (atomically); returns how many went.

    A run killed after its last checkpoint logged iterations that its resumed run logs again;
    without this they would appear twice. A torn last line (killed mid-write) goes too.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(row.get("iteration", 0)) > iteration:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


class JsonlTracker:
    """Appends each record to ``path``. The resolved config and the exports already live in the run
    directory (config.yaml, export/), so params and export paths need no copy here."""

    name = "jsonl"

    def __init__(self, path: str | os.PathLike, *, resume_iteration: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iteration is not None:
            drop_rows_after(self.path, resume_iteration)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nothing to do: the caller writes the resolved config beside the metrics."""

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        """One line per call; appending one line and flushing keeps the file valid JSONL if the process dies."""
        with open(self.path, "a") as handle:
            handle.write(json.dumps(dict(record)) + "\n")

    def log_export(self, paths: Sequence[Path]) -> None:
        """Nothing to do: exports are files of the run directory."""

    def close(self, status: str = "FINISHED") -> None:
        """Nothing is held open between writes."""
