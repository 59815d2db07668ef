"""``metrics.jsonl`` (one JSON object per logged iteration) and TensorBoard when installed."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..config import atomic_write_text


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


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


class MetricsWriter:
    """``resume_iteration``: the run resumed from a checkpoint at that iteration; rows (and
    TensorBoard events) past it, from the killed run, are discarded first."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True,
                 resume_iteration: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if enabled and resume_iteration is not None:
            drop_rows_after(self.path, resume_iteration)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                purge = {} if resume_iteration is None else {"purge_step": resume_iteration + 1}
                self._tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"), **purge)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # Appending one line and flushing keeps the file valid JSONL if the process dies.
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record.get("iteration", 0))
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
