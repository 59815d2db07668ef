"""Weights & Biases: the config, metrics per step and the export path of one W&B run (needs
``pip install '.[wandb]'``). ``mode=offline`` writes the run under ``<dir>/wandb/`` for ``wandb sync``."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

logger = logging.getLogger("dinov2_repro")
WANDB_MODES = ("online", "offline", "disabled")


class WandbTracker:
    """One W&B run; ``run_id`` continues an earlier run (``resume="allow"``)."""

    name = "wandb"

    def __init__(self, *, project: str, entity: str, mode: str, directory: str | os.PathLike, run_name: str,
                 config: Mapping[str, Any], run_id: str | None = None) -> None:
        import wandb

        Path(directory).mkdir(parents=True, exist_ok=True)
        # console off: W&B would otherwise wrap stdout/stderr, which the training's own logging owns.
        settings = wandb.Settings(console="off", silent=True)
        self.run = wandb.init(project=project, entity=entity or None, mode=mode or None, dir=str(directory),
                              name=run_name, config=dict(config), id=run_id, resume="allow" if run_id else None,
                              settings=settings)
        self.run_id = self.run.id
        logger.info("wandb: run %s in project %r (%s, %s)", self.run_id, project, mode or "default mode", directory)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nothing more to do: the nested config went to ``wandb.init`` (W&B's own config view)."""

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        values = {key: value for key, value in record.items()
                  if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value)}
        self.run.log(values, step=step)

    def log_export(self, paths: Sequence[Path]) -> None:
        self.run.summary["export_path"] = ",".join(str(Path(p).resolve()) for p in paths)

    def close(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
