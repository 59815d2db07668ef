"""``TrackerSet``: every tracker of one run behind one small interface (params, metrics per step,
export paths, close), opened on rank 0 only.

Each tracker has ``log_params(flat)``, ``log_metrics(record, step)``, ``log_export(paths)`` and
``close(status)``. The ids of the MLflow and W&B runs are kept in ``<run dir>/trackers.json`` so a
resumed training run logs into the same runs.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import ConfigError, flatten_keys
from ..io.files import atomic_write_json
from .settings import TrackingSettings, is_installed

logger = logging.getLogger("dinov2_repro")
RECORD_FILE = "trackers.json"


def flatten_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Nested config to ``{"a.b.c": value}``; lists stay values (MLflow and TensorBoard show them as text)."""
    return flatten_keys(config)


class TrackerSet:
    """Fans each call out to the run's trackers. A tracker that fails mid-run (a tracking server
    gone away) is reported once and then left out: hours of training are not lost to a dashboard."""

    def __init__(self, trackers: Sequence[Any] = (), *, record_path: Path | None = None,
                 record: dict[str, Any] | None = None) -> None:
        self.trackers = list(trackers)
        self.record_path = record_path
        self.record = record or {}
        self._closed = False

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def get(self, name: str) -> Any:
        """The tracker called ``name`` (jsonl, tensorboard, mlflow, wandb), or None."""
        return next((t for t in self.trackers if t.name == name), None)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:
                if tracker.name == "jsonl":  # the run's own record: never silently lost
                    raise
                logger.warning("%s: %s failed (%s: %s); no more logging to %s in this run",
                               tracker.name, method, type(error).__name__, error, tracker.name)
                self.trackers.remove(tracker)

    def log_params(self, config: Mapping[str, Any]) -> None:
        """The resolved config (nested), flattened to dotted keys."""
        self._each("log_params", flatten_params(config))

    def log_metrics(self, record: Mapping[str, Any], step: int | None = None) -> None:
        """One row of metrics at ``step`` (default: the record's ``iteration``)."""
        self._each("log_metrics", record, int(record.get("iteration", 0)) if step is None else int(step))

    def log_export(self, paths: Path | Sequence[Path]) -> None:
        """The final (or latest) export file(s) of the run."""
        paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        self._each("log_export", paths)
        self.record["export_paths"] = [str(p.resolve()) for p in paths]
        self._save_record()

    def close(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED (MLflow's run states); only the first call counts."""
        if self._closed:
            return
        self._closed = True
        self._each("close", status)

    def _save_record(self) -> None:
        if self.record_path is not None and self.record:
            atomic_write_json(self.record_path, self.record)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def open_trackers(settings: TrackingSettings, *, config: Mapping[str, Any], enabled: bool = True,
                  resume_iteration: int | None = None, continue_runs: bool = False) -> TrackerSet:
    """Open the trackers of ``settings`` and log ``config`` (nested, resolved) as the run's params.

    ``enabled=False`` (ranks other than 0) gives an empty set. ``resume_iteration``: rows and
    events past it are dropped from metrics.jsonl and TensorBoard. ``continue_runs``: reuse the
    MLflow/W&B run ids of ``trackers.json`` (a run resumed from its checkpoint). jsonl and
    tensorboard need ``settings.run_dir``; without one they are skipped.
    """
    if not enabled:
        return TrackerSet()
    from .jsonl_tracker import JsonlTracker

    run_dir = settings.run_dir
    record_path = run_dir / RECORD_FILE if run_dir is not None else None
    previous = _read_record(record_path) if continue_runs and record_path is not None else {}
    trackers: list[Any] = []
    record: dict[str, Any] = {}
    if run_dir is not None:
        trackers.append(JsonlTracker(run_dir / "metrics.jsonl", resume_iteration=resume_iteration))
    if "tensorboard" in settings.loggers and run_dir is not None:
        if is_installed("tensorboard"):
            from .tensorboard_tracker import TensorBoardTracker

            trackers.append(TensorBoardTracker(run_dir / "tensorboard", resume_iteration=resume_iteration))
        else:
            logger.warning("%s includes tensorboard but the tensorboard package is not installed "
                           "(pip install tensorboard): no TensorBoard events", settings.loggers_key)
    if "mlflow" in settings.loggers:
        from .mlflow_tracker import MlflowTracker, resolve_tracking_uri

        uri = resolve_tracking_uri(settings.mlflow_tracking_uri, run_dir)
        earlier = previous.get("mlflow", {})
        run_id = earlier.get("run_id") if earlier.get("tracking_uri") == uri else None
        try:
            tracker = MlflowTracker(tracking_uri=uri, experiment=settings.mlflow_experiment, run_name=settings.name,
                                    run_id=run_id)
        except Exception as error:
            raise ConfigError(f"{settings.section_key}mlflow.tracking_uri={uri!r}: cannot open an MLflow run there "
                              f"({type(error).__name__}: {' '.join(str(error).split())[:300]})") from error
        trackers.append(tracker)
        record["mlflow"] = {"run_id": tracker.run_id, "tracking_uri": uri, "experiment": settings.mlflow_experiment}
    if "wandb" in settings.loggers:
        from .wandb_tracker import WandbTracker

        directory = Path(settings.wandb_dir) if settings.wandb_dir else (run_dir or Path("."))
        earlier = previous.get("wandb", {})
        run_id = earlier.get("run_id") if earlier.get("project") == settings.wandb_project else None
        try:
            tracker = WandbTracker(project=settings.wandb_project, entity=settings.wandb_entity,
                                   mode=settings.wandb_mode, directory=directory, run_name=settings.name,
                                   config=config, run_id=run_id)
        except Exception as error:
            raise ConfigError(f"{settings.section_key}wandb: cannot start a W&B run ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:300]}); log in with `wandb login`, or set "
                              f"{settings.section_key}wandb.mode=offline") from error
        trackers.append(tracker)
        record["wandb"] = {"run_id": tracker.run_id, "project": settings.wandb_project,
                           "dir": str(directory.resolve()), "mode": settings.wandb_mode}
    if "export_paths" in previous:
        record["export_paths"] = previous["export_paths"]
    trackers_set = TrackerSet(trackers, record_path=record_path, record=record)
    trackers_set._save_record()
    trackers_set.log_params(config)
    return trackers_set
