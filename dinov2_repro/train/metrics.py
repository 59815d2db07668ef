"""``metrics.jsonl`` (one JSON object per logged iteration) and TensorBoard when installed."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class MetricsWriter:
    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

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
