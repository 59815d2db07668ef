"""``metrics.jsonl`` (one JSON object per logged iteration): reading it, and ETA formatting.
Writing goes through ``dinov2_repro.tracking`` (jsonl always, TensorBoard, MLflow, W&B)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..tracking.jsonl_tracker import JsonlTracker, drop_rows_after  # noqa: F401  (drop_rows_after: importable from here too)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class MetricsWriter:
    """``metrics.jsonl`` plus TensorBoard events when installed, outside the training loop (which
    logs through ``dinov2_repro.tracking``). ``resume_iteration``: rows (and TensorBoard events)
    past it, from a killed run, are discarded first."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True,
                 resume_iteration: int | None = None) -> None:
        from ..tracking import TrackerSet
        from ..tracking.settings import is_installed

        self.path = Path(path)
        trackers: list[Any] = []
        if enabled:
            trackers.append(JsonlTracker(self.path, resume_iteration=resume_iteration))
            if tensorboard and is_installed("tensorboard"):
                from ..tracking.tensorboard_tracker import TensorBoardTracker

                trackers.append(TensorBoardTracker(self.path.parent / "tensorboard", resume_iteration=resume_iteration))
        self._trackers = TrackerSet(trackers)

    def write(self, record: dict[str, Any]) -> None:
        self._trackers.log_metrics(record)

    def close(self) -> None:
        self._trackers.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
