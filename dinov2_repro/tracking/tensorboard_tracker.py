"""TensorBoard event files in ``<run dir>/tensorboard`` (needs the ``tensorboard`` package)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence


class TensorBoardTracker:
    """Scalars per step, the resolved config and the export paths as text.

    ``resume_iteration``: events past it, from a killed run, are purged (the resumed run logs them again)."""

    name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike, *, resume_iteration: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = {} if resume_iteration is None else {"purge_step": resume_iteration + 1}
        self.writer = SummaryWriter(log_dir=str(log_dir), **purge)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The flattened config as one text entry (TensorBoard's TEXT tab)."""
        lines = [f"    {key}: {value}" for key, value in params.items()]  # indented: markdown code block
        self.writer.add_text("config", "\n".join(lines), 0)

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def log_export(self, paths: Sequence[Path]) -> None:
        self.writer.add_text("export_path", "\n\n".join(str(p) for p in paths), 0)

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()
