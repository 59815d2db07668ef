"""Trackers of ``eval seg`` (``--loggers``, ``--tracking KEY=VALUE``): the same backends and
``tracking:`` keys as training, set from the command line.

What is logged: the command's settings as params; per training step the loss (``train_loss``, with
the sweep's ``lr``; the step counts on across the learning-rate sweep, so every tracker sees one
increasing series); each learning rate's validation mIoU at its last step; the test metrics and
the chosen lr at the end; the run directory's head (and fine-tuned backbone) as the export path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ...config import DEFAULTS_PATH, ConfigError, _read_yaml, parse_overrides, validate_against
from ...tracking import TrackerSet, TrackingSettings, check_settings, open_trackers, settings_from_section

RUN_FILES = ("metrics.jsonl", "trackers.json")  # what the jsonl tracker adds to an --out-dir


def seg_tracking_settings(loggers: str, tracking: Sequence[str], out_dir: Path | None) -> TrackingSettings:
    """``--loggers a,b`` and ``--tracking`` overrides of the ``tracking:`` section, checked (ConfigError)."""
    defaults = _read_yaml(Path(DEFAULTS_PATH))["tracking"]
    update = parse_overrides(tracking)
    validate_against(defaults, update, "--tracking")
    section = _merge(defaults, update)
    names = [name for name in loggers.split(",") if name.strip()]
    settings = settings_from_section(names, section, run_dir=out_dir, loggers_key="--loggers", section_key="--tracking ")
    check_settings(settings)
    return settings


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(base[key], value) if isinstance(value, Mapping) and isinstance(base.get(key), Mapping) else value
    return merged


def open_seg_trackers(settings: TrackingSettings, options: Mapping[str, Any]) -> TrackerSet:
    """The trackers of one ``eval seg`` run, with the run's options as params."""
    params = {key: (value if isinstance(value, (bool, int, float, str)) or value is None else str(value))
              for key, value in sorted(options.items())}
    return open_trackers(settings, config={"seg": params}, resume_iteration=0)  # a rerun into --out-dir starts a fresh metrics.jsonl


def log_lr_run(trackers: TrackerSet | None, *, index: int, lr: float, iterations: int, curve: Sequence[float],
               val: Mapping[str, Any]) -> None:
    """The loss of every step of the ``index``-th learning rate, then its validation mIoU."""
    if trackers is None:
        return
    offset = index * iterations
    for step, loss in enumerate(curve, start=1):
        trackers.log_metrics({"iteration": offset + step, "lr": float(lr), "train_loss": float(loss)})
    trackers.log_metrics({"iteration": offset + max(len(curve), 1), "lr": float(lr), "val/miou": float(val["miou"])})


def log_result(trackers: TrackerSet | None, result: Mapping[str, Any], *, step: int, exports: Sequence[Path]) -> None:
    """Test metrics and the chosen lr at the last step; the saved files as the export path."""
    if trackers is None:
        return
    test = result["test"]
    row: dict[str, Any] = {"iteration": step, "best_lr": float(result["lr"]), "val/miou_best": float(result["val"]["miou"])}
    row.update({f"test/{key}": float(test[key]) for key in ("miou", "pixel_accuracy", "f1") if key in test})
    if "objects" in test:
        row["test/object_f1"] = float(test["objects"]["object_f1"])
    trackers.log_metrics(row)
    if exports:
        trackers.log_export(list(exports))


def refuse_label_efficiency(settings: TrackingSettings) -> None:
    if [name for name in settings.loggers if name != "jsonl"]:
        raise ConfigError("--loggers applies to single runs; label efficiency (--n-labelled) writes "
                          "label_efficiency.json only: remove --loggers or --n-labelled")
