"""Experiment trackers: metrics.jsonl (always), TensorBoard, MLflow and Weights & Biases.

- :mod:`dinov2_repro.tracking.settings`: ``train.loggers`` / ``tracking:`` (or ``--loggers`` /
  ``--tracking``) resolved and checked before any work.
- :mod:`dinov2_repro.tracking.run_trackers`: ``open_trackers`` and ``TrackerSet``, the one
  interface the training loop and segmentation log through (rank 0 only).
- one module per backend: ``jsonl_tracker``, ``tensorboard_tracker``, ``mlflow_tracker``, ``wandb_tracker``.
- :mod:`dinov2_repro.tracking.wandb_offline`: read an offline W&B run back without syncing it.
"""
from .run_trackers import TrackerSet, flatten_params, open_trackers
from .settings import LOGGERS, TrackingSettings, check_settings, normalise_loggers, settings_from_config, settings_from_section

__all__ = ["LOGGERS", "TrackerSet", "TrackingSettings", "check_settings", "flatten_params", "normalise_loggers",
           "open_trackers", "settings_from_config", "settings_from_section"]
