"""Which trackers a run logs to and their settings, checked before any work starts.

Training and distillation read ``train.loggers`` and the ``tracking:`` section of the config;
segmentation reads ``--loggers`` and ``--tracking KEY=VALUE`` (keys of the same section).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

from ..config import ConfigError
from .wandb_tracker import WANDB_MODES

LOGGERS = ("jsonl", "tensorboard", "mlflow", "wandb")
# The optional extra that installs each tracker's package (tensorboard: the `test` extra, or by hand).
INSTALL_HINTS = {"tensorboard": "pip install tensorboard",
                 "mlflow": "pip install '.[mlflow]' in the checkout, or pip install mlflow-skinny",
                 "wandb": "pip install '.[wandb]' in the checkout, or pip install wandb"}
# MLflow stores that need SQLAlchemy, which the full `mlflow` package brings and mlflow-skinny does not.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


@dataclasses.dataclass(frozen=True)
class TrackingSettings:
    """Resolved tracker settings of one run. ``loggers`` always starts with jsonl. ``loggers_key``
    and ``section_key`` are how error messages name the settings (config keys or CLI options)."""

    loggers: tuple[str, ...]
    run_dir: Path | None
    run_name: str = ""
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = "dinov2_repro"
    wandb_project: str = "dinov2_repro"
    wandb_entity: str = ""
    wandb_mode: str = ""
    wandb_dir: str = ""
    loggers_key: str = "train.loggers"
    section_key: str = "tracking."

    @property
    def name(self) -> str:
        """The run's name in MLflow and W&B: ``tracking.run_name``, else the run directory's name."""
        if self.run_name:
            return self.run_name
        return self.run_dir.resolve().name if self.run_dir is not None else "dinov2_repro"


def normalise_loggers(values: Iterable[str] | str, *, key: str = "train.loggers") -> tuple[str, ...]:
    """The tracker names, checked, without duplicates, jsonl first (it is always on)."""
    names = [values] if isinstance(values, str) else list(values)
    result = ["jsonl"]
    for name in names:
        name = str(name).strip().lower()
        if not name:
            continue
        if name not in LOGGERS:
            raise ConfigError(f"{key}: unknown tracker {name!r}; choose from {', '.join(LOGGERS)}")
        if name not in result:
            result.append(name)
    return tuple(result)


def settings_from_section(loggers: Iterable[str] | str, section: Mapping[str, Any], *, run_dir: Path | None,
                          loggers_key: str, section_key: str) -> TrackingSettings:
    """Settings from a ``tracking:`` section (a mapping with run_name, mlflow.*, wandb.*)."""
    mlflow, wandb = section.get("mlflow", {}), section.get("wandb", {})
    return TrackingSettings(
        loggers=normalise_loggers(loggers, key=loggers_key), run_dir=run_dir, run_name=str(section.get("run_name", "")),
        mlflow_tracking_uri=str(mlflow.get("tracking_uri", "")), mlflow_experiment=str(mlflow.get("experiment", "")),
        wandb_project=str(wandb.get("project", "")), wandb_entity=str(wandb.get("entity", "")),
        wandb_mode=str(wandb.get("mode", "")), wandb_dir=str(wandb.get("dir", "")),
        loggers_key=loggers_key, section_key=section_key)


def settings_from_config(cfg: Any) -> TrackingSettings:
    """Settings of a training or distillation config: ``train.loggers`` (``train.tensorboard=false``,
    the older switch, drops tensorboard from it) and the ``tracking:`` section."""
    loggers = [str(name) for name in cfg.train.loggers] if not isinstance(cfg.train.loggers, str) else [cfg.train.loggers]
    if not cfg.train.get("tensorboard", True):
        loggers = [name for name in loggers if name != "tensorboard"]
    return settings_from_section(loggers, cfg.tracking, run_dir=Path(str(cfg.train.output_dir)),
                                 loggers_key="train.loggers", section_key="tracking.")


def is_installed(logger_name: str) -> bool:
    """Whether the package a tracker needs can be imported (without importing it: that is slow)."""
    module = {"jsonl": None, "tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}[logger_name]
    return module is None or importlib.util.find_spec(module) is not None


def check_settings(settings: TrackingSettings) -> None:
    """Raise ConfigError (one line naming the key) for a tracker that is not installed or a
    setting it cannot use. TensorBoard, on by default, is only skipped with a warning when
    missing (see ``open_trackers``); mlflow and wandb must be installed when asked for."""
    key, section = settings.loggers_key, settings.section_key
    for name in ("mlflow", "wandb"):
        if name in settings.loggers and not is_installed(name):
            raise ConfigError(f"{key} includes {name} but the {name} package is not installed: "
                              f"{INSTALL_HINTS[name]} (or remove {name} from {key})")
    if settings.wandb_mode not in ("", *WANDB_MODES):
        raise ConfigError(f"{section}wandb.mode={settings.wandb_mode!r}: choose one of {', '.join(WANDB_MODES)} "
                          "('' for $WANDB_MODE or W&B's default, online)")
    if "wandb" in settings.loggers and not settings.wandb_project:
        raise ConfigError(f"{section}wandb.project is empty: name the W&B project")
    if "mlflow" in settings.loggers:
        if not settings.mlflow_experiment:
            raise ConfigError(f"{section}mlflow.experiment is empty: name the MLflow experiment")
        scheme = urlparse(settings.mlflow_tracking_uri).scheme
        if scheme.split("+")[0] in DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
            raise ConfigError(f"{section}mlflow.tracking_uri={settings.mlflow_tracking_uri!r}: a database store needs "
                              "SQLAlchemy, which mlflow-skinny lacks; pip install mlflow (the full package), or use "
                              "a file:PATH or http(s):// tracking URI")
