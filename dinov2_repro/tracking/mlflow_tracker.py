"""MLflow: params, metrics per step and the export path of one MLflow run (needs ``pip install '.[mlflow]'``).

Uses ``MlflowClient`` on an explicit tracking URI rather than ``mlflow.start_run``: no process-wide
active run, so a training run inside a notebook or a pipeline leaves MLflow's global state alone.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

logger = logging.getLogger("dinov2_repro")

# MLflow's limits per log_batch call and per param value.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
# MLflow 3 refuses a file store unless this is set; a tracking URI naming a local folder is the opt-in.
ALLOW_FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"


def resolve_tracking_uri(value: str, run_dir: Path | None) -> str:
    """The URI to log to: ``value``; '' means $MLFLOW_TRACKING_URI, else a file store in
    ``<run_dir>/mlruns`` (``./mlruns`` without a run directory). A plain path becomes a ``file:`` URI."""
    uri = value or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return ((run_dir or Path(".")) / "mlruns").resolve().as_uri()
    parsed = urlparse(uri)
    if not parsed.scheme or len(parsed.scheme) == 1:  # a path (a Windows drive letter is no scheme)
        return Path(uri).resolve().as_uri()
    if parsed.scheme == "file" and not parsed.netloc and not Path(parsed.path).is_absolute():
        # file:runs/mlruns: pinned to an absolute path, so a resumed run (or a Slurm job started
        # elsewhere) finds the same store.
        return Path(parsed.path).resolve().as_uri()
    return uri


def metric_name(key: str) -> str:
    """``grad_norm/backbone`` becomes ``grad_norm.backbone``: a file store keeps each metric as a
    file named by its key, so ``grad_norm`` and ``grad_norm/backbone`` would need a file and a
    folder of the same name."""
    return key.replace("/", ".")


def is_file_store(uri: str) -> bool:
    return urlparse(uri).scheme == "file"


class MlflowTracker:
    """One MLflow run in ``experiment`` at ``tracking_uri``; ``run_id`` continues an earlier run
    (a resumed training run logs into the run its first part created)."""

    name = "mlflow"

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        if is_file_store(tracking_uri):
            os.environ.setdefault(ALLOW_FILE_STORE_ENV, "true")
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id = self._reopen(run_id) if run_id else None
        if self.run_id is None:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        logger.info("mlflow: run %s in experiment %r at %s", self.run_id, experiment, tracking_uri)

    def _reopen(self, run_id: str) -> str | None:
        try:
            self.client.get_run(run_id)
        except Exception as error:  # deleted, or another store: start a new run rather than fail the training
            logger.warning("mlflow: cannot continue run %s (%s); starting a new run", run_id, error)
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Every param not logged yet; MLflow forbids changing a logged value, so a resumed run with
        a changed setting keeps the first value and says so."""
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        fresh = []
        for key, value in params.items():
            text = str(value)[:MAX_PARAM_LENGTH]
            if key not in logged:
                fresh.append(Param(key, text))
            elif logged[key] != text:
                logger.warning("mlflow: param %s was %r in this run and is now %r; MLflow keeps the first value",
                               key, logged[key], text)
        for start in range(0, len(fresh), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=fresh[start:start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, record: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(metric_name(key), float(value), stamp, step) for key, value in record.items()
                   if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool)
                   and math.isfinite(value)]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])

    def log_export(self, paths: Sequence[Path]) -> None:
        """The export files as the ``export_path`` tag (absolute paths, comma-separated): the files
        stay where the run wrote them, nothing is copied into the artifact store."""
        self.client.set_tag(self.run_id, "export_path", ",".join(str(Path(p).resolve()) for p in paths))

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
