"""Semantic checks of a training config, run before any model is built or worker started.

``load_config`` checks key names and value types; this module checks that the values make
sense together and with the data: a mistake found here costs a fraction of a second and one
line naming the key and the value, instead of a hang, a traceback minutes in, or a run that
"succeeds" having trained nothing.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from ..config import ConfigError
from ..models.layers.attention import BACKENDS, resolve_backend

logger = logging.getLogger("dinov2_repro")

# How many samples to try when looking for the dataset's first readable one (the loader gives up
# after 50 consecutive unreadable samples too).
MAX_PROBED_SAMPLES = 50
CHOICES = {
    "train.centering": ("centering", "sinkhorn_knopp"),
    "train.stochastic_depth": ("efficient", "droppath"),
    "train.device": ("auto", "cpu", "cuda"),
    "compute_precision.param_dtype": ("bf16", "fp16", "fp32"),
    "train.attention_backend": BACKENDS,
}


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {what}")


def _check_lengths(cfg: DictConfig) -> None:
    for key in ("train.OFFICIAL_EPOCH_LENGTH", "optim.epochs", "train.batch_size_per_gpu", "crops.global_crops_size",
                "train.grad_accumulation"):
        value = _get(cfg, key)
        _require(value > 0, key, value, "must be > 0 (a run of zero length trains nothing)")
    for key in ("train.num_workers", "train.max_iterations", "train.checkpoint_period_iterations",
                "optim.warmup_epochs", "crops.local_crops_number", "evaluation.eval_period_iterations",
                "train.log_period_iterations", "optim.freeze_last_layer_epochs", "teacher.warmup_teacher_temp_epochs"):
        value = _get(cfg, key)
        _require(value >= 0, key, value, "must be >= 0")
    if cfg.train.checkpoint_period_iterations == 0:
        _require(cfg.train.saveckp_freq > 0, "train.saveckp_freq", cfg.train.saveckp_freq,
                 "must be > 0 when train.checkpoint_period_iterations is 0 (no checkpoint period otherwise)")
    _require(cfg.train.keep_last_checkpoints >= 1, "train.keep_last_checkpoints", cfg.train.keep_last_checkpoints,
             "must be >= 1 (resume needs the last checkpoint)")
    if cfg.crops.local_crops_number > 0:
        _require(cfg.crops.local_crops_size > 0, "crops.local_crops_size", cfg.crops.local_crops_size, "must be > 0")
    _require(cfg.optim.base_lr > 0, "optim.base_lr", cfg.optim.base_lr, "must be > 0")


def _check_warm_start(cfg: DictConfig) -> None:
    """The continued-pretraining keys: a frozen backbone needs MODEL.WEIGHTS, the freeze must end
    before the run does, the file must fit the `student:` section."""
    from .initialize import is_backbone_file
    from .schedules import total_iterations

    for key in ("train.freeze_backbone_iterations", "train.unfreeze_lr_ramp_iterations"):
        value = _get(cfg, key)
        _require(value >= 0, key, value, "must be >= 0")
    weights = str(cfg.MODEL.WEIGHTS)
    freeze = int(cfg.train.freeze_backbone_iterations)
    if freeze:
        _require(bool(weights), "train.freeze_backbone_iterations", freeze,
                 "freezes the backbone, but MODEL.WEIGHTS is empty: a random backbone would stay random; "
                 "set MODEL.WEIGHTS or use 0")
        total = total_iterations(cfg)
        _require(freeze < total, "train.freeze_backbone_iterations", freeze,
                 f"must be smaller than the run's {total} iterations (the backbone would never train)")
    if weights and is_backbone_file(weights):
        from .initialize import check_backbone_fits, read_backbone_header

        check_backbone_fits(read_backbone_header(weights, key="MODEL.WEIGHTS"), cfg.student, weights)
    if weights and is_backbone_file(weights) and not freeze:
        logger.warning("MODEL.WEIGHTS=%s is a backbone without DINO/iBOT heads and train.freeze_backbone_iterations=0: "
                       "the fresh heads will train the backbone from their first (random) targets; naive continued "
                       "pretraining has been reported to collapse (see docs/released-weights.md)", weights)


def check_rope_keys(student_cfg: DictConfig, where: str = "student") -> None:
    """``<where>.rope_*``: only DINOv3 archs have RoPE; the factors must be valid."""
    from ..models import is_dinov3_arch
    from .meta_arch import ROPE_KEYS

    for key in ROPE_KEYS:
        value = student_cfg.get(key)
        if value is None:
            continue
        _require(is_dinov3_arch(str(student_cfg.arch)), f"{where}.{key}", value,
                 f"{student_cfg.arch} has a learned position embedding, not RoPE; remove the key (DINOv3 archs only)")
        low = 0.0 if key == "rope_shift" else 1.0
        _require(float(value) >= low, f"{where}.{key}", value, f"must be >= {low:g} (or null for the default)")


def _check_interval(key: str, value: Sequence[float], *, low_open: bool) -> None:
    values = list(value)
    _require(len(values) == 2, key, values, "give [min, max]")
    low, high = values
    _require(low <= high, key, values, "is inverted: the first value must be <= the second")
    _require((low > 0 if low_open else low >= 0) and high <= 1, key, values,
             f"both values must lie in {'(0' if low_open else '[0'}, 1]")


def _check_choices(cfg: DictConfig) -> None:
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        _require(value in choices, key, value, f"unknown; choose one of {', '.join(choices)}")
    if cfg.compute_precision.param_dtype == "fp16" and cfg.train.device == "cpu":
        raise ConfigError("compute_precision.param_dtype='fp16' needs CUDA; use bf16 or fp32 with train.device=cpu")
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but CUDA is not available; use auto or cpu")
    try:
        resolve_backend(cfg.train.attention_backend, torch.device("cuda" if cuda else "cpu"))
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"train.attention_backend={cfg.train.attention_backend!r}: {error}") from None


def _check_crops(cfg: DictConfig) -> None:
    crops, patch = cfg.crops, cfg.student.patch_size
    _require(patch > 0, "student.patch_size", patch, "must be > 0")
    _check_interval("crops.global_crops_scale", crops.global_crops_scale, low_open=True)
    _check_interval("crops.local_crops_scale", crops.local_crops_scale, low_open=True)
    _check_interval("ibot.mask_ratio_min_max", cfg.ibot.mask_ratio_min_max, low_open=False)
    sizes = ["global_crops_size"] + (["local_crops_size"] if crops.local_crops_number > 0 else [])
    for key in sizes:
        _require(crops[key] % patch == 0, f"crops.{key}", crops[key],
                 f"must be a multiple of student.patch_size={patch}")
    in_chans = cfg.student.in_chans
    _require(in_chans > 0, "student.in_chans", in_chans, "must be > 0")
    for key in ("mean", "std"):
        values = list(crops[key])
        _require(len(values) == in_chans, f"crops.{key}", values,
                 f"has {len(values)} entries but student.in_chans={in_chans}: give one value per band")
    _require(all(s > 0 for s in crops.std), "crops.std", list(crops.std), "every entry must be > 0")


def band_count(image: Any) -> int:
    """Bands of a sample as the datasets return it: a PIL image, or a (C, H, W) tensor/array."""
    if hasattr(image, "getbands"):
        return len(image.getbands())
    if isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 3:
        return int(image.shape[0])
    raise ConfigError(f"train.dataset_path: cannot tell the band count of a sample of type {type(image).__name__}")


def first_readable_sample(dataset_path: str) -> tuple[Any, int]:
    """The first sample of the dataset that decodes, and its index; ConfigError when none of the
    first MAX_PROBED_SAMPLES does (a folder of only corrupt files)."""
    from ..data import build_dataset

    try:
        dataset = build_dataset(dataset_path)
    except (OSError, ValueError, ImportError) as error:
        raise ConfigError(f"train.dataset_path={dataset_path!r}: {error}") from None
    describe = getattr(dataset, "describe", lambda i: f"index {i}")
    last_error = None
    for index in range(min(len(dataset), MAX_PROBED_SAMPLES)):
        try:
            image, _ = dataset[index]
        except Exception as error:  # any decode error: try the next one, like the loader does
            last_error = f"{describe(index)}: {type(error).__name__}: {error}"
            continue
        if last_error is not None:  # one line, not one per file: the loader logs each skip when it meets it
            logger.warning("validation: %d unreadable sample(s) before the first readable one (last: %s)", index, last_error)
        return image, index
    raise ConfigError(f"train.dataset_path={dataset_path!r}: none of the first {min(len(dataset), MAX_PROBED_SAMPLES)} "
                      f"samples is readable (last: {last_error})")


def _check_bands_against_data(cfg: DictConfig) -> None:
    image, index = first_readable_sample(cfg.train.dataset_path)
    bands = band_count(image)
    _require(bands == cfg.student.in_chans, "student.in_chans", cfg.student.in_chans,
             f"does not match sample {index} of train.dataset_path={cfg.train.dataset_path!r} has {bands} band(s); "
             f"set student.in_chans and crops.mean/std to {bands} values, or select bands in the dataset")


def check_output_dir_writable(key: str, path: str | os.PathLike) -> None:
    """Create ``path`` and write a probe file in it; ConfigError naming ``key`` otherwise."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_probe_"):
            pass
    except OSError as error:
        raise ConfigError(f"{key}={str(path)!r} is not writable: {error.strerror or error}") from None


def check_trackers(cfg: DictConfig) -> None:
    """``train.loggers`` and the ``tracking:`` section: known tracker names, their packages
    installed (one line saying which extra to install), settings they can use."""
    from ..tracking import check_settings, settings_from_config

    check_settings(settings_from_config(cfg))


def validate_train_config(cfg: DictConfig, *, check_data: bool = True) -> None:
    """All semantic checks of an SSL (or distillation) config; raises ConfigError with one line.

    ``check_data=False`` skips opening the dataset (for callers whose data is not an image dataset).
    """
    _check_lengths(cfg)
    if cfg.train.grad_accumulation > 1 and cfg.train.centering == "sinkhorn_knopp":
        # Softmax centres accumulate over a step's micro-batches; Sinkhorn-Knopp normalises the
        # batch of one forward, so its global batch is one micro-batch per rank.
        logger.warning("train.grad_accumulation=%d with train.centering=sinkhorn_knopp: Sinkhorn-Knopp normalises "
                       "each micro-batch (batch_size_per_gpu x ranks), not the accumulated global batch",
                       cfg.train.grad_accumulation)
    _check_warm_start(cfg)
    check_rope_keys(cfg.student)
    _check_choices(cfg)
    check_trackers(cfg)
    _check_crops(cfg)
    check_output_dir_writable("train.output_dir", cfg.train.output_dir)
    if check_data:
        _check_bands_against_data(cfg)
