"""Curation config: ``configs/curation/default.yaml`` <- an experiment YAML <- ``key=value``.

The project's config loader does the merging and validation (an unknown key is an error that
names it), so curation and training configs behave the same way.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from dinov2_repro.config import CONFIG_DIR, ConfigError, load_config

CURATION_CONFIG_DIR = CONFIG_DIR / "curation"
DEFAULT_CONFIG = CURATION_CONFIG_DIR / "default.yaml"

__all__ = ["ConfigError", "DEFAULT_CONFIG", "load_curation_config", "save_resolved"]


def load_curation_config(config_file: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    cfg = load_config(config_file, overrides, defaults_file=DEFAULT_CONFIG)
    _check(cfg)
    return cfg


def _check(cfg: DictConfig) -> None:
    """Value checks the type validation cannot do; each error names the key and value."""
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"config key {key!r} = {OmegaConf.select(cfg, key)!r}: {message}")

    if cfg.tile.size <= 0:
        fail("tile.size", "must be positive")
    if cfg.tile.stride <= 0:
        fail("tile.stride", "must be positive")
    if not 0.0 <= cfg.tile.max_invalid_fraction <= 1.0:
        fail("tile.max_invalid_fraction", "must be in [0, 1]")
    if cfg.dedup.k < 1:
        fail("dedup.k", "must be >= 1")
    for key in ("dedup.threshold", "dedup.relative_threshold"):
        if not -1.0 <= OmegaConf.select(cfg, key) <= 1.0:
            fail(key, "a cosine threshold must be in [-1, 1]")
    if not 0.0 <= cfg.dedup.max_removed_fraction <= 1.0:
        fail("dedup.max_removed_fraction", "must be in [0, 1]")
    if cfg.dedup.keep_policy not in ("largest", "first"):
        fail("dedup.keep_policy", "must be 'largest' or 'first'")
    verify = cfg.dedup.verify
    if verify.k < 1:
        fail("dedup.verify.k", "must be >= 1")
    if verify.region_k < 0:
        fail("dedup.verify.region_k", "must be >= 0 (0 turns region candidates off)")
    if not 0.25 <= verify.region_side < 1.0:
        fail("dedup.verify.region_side", "side fraction in [0.25, 1)")
    if not 0.0 < verify.target_recall < 1.0:
        fail("dedup.verify.target_recall", "must be in (0, 1)")
    if not 0.0 < verify.min_overlap <= 1.0:
        fail("dedup.verify.min_overlap", "must be in (0, 1]")
    if not verify.scales or any(not 0.2 <= float(s) <= 1.0 for s in verify.scales):
        fail("dedup.verify.scales", "side fractions in [0.2, 1]")
    if verify.method not in ("exact", "coarse_to_fine"):
        fail("dedup.verify.method", "must be 'exact' or 'coarse_to_fine'")
    if verify.coarse_candidates < 1:
        fail("dedup.verify.coarse_candidates", "must be >= 1")
    if verify.work_size < 16:
        fail("dedup.verify.work_size", "must be >= 16 pixels")
    if verify.calibration_images < 4:
        fail("dedup.verify.calibration_images", "must be >= 4")
    if cfg.retrieve.mode not in ("none", "sample", "cluster"):
        fail("retrieve.mode", "must be 'none', 'sample' or 'cluster'")
    if cfg.retrieve.shard_size < 1:
        fail("retrieve.shard_size", "must be >= 1")
    if any(int(k) < 1 for k in cfg.cluster.levels):
        fail("cluster.levels", "every level needs >= 1 cluster")
    if cfg.cluster.resampling_steps < 0:
        fail("cluster.resampling_steps", "must be >= 0")
    if cfg.cluster.shard_size < 1:
        fail("cluster.shard_size", "must be >= 1")
    if cfg.embed.shard_size < 1:
        fail("embed.shard_size", "must be >= 1")
    if cfg.embed.num_procs < 1:
        fail("embed.num_procs", "must be >= 1")


def save_resolved(cfg: DictConfig, output_dir: str | os.PathLike) -> Path:
    from .io import atomic_write_text

    return atomic_write_text(Path(output_dir) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
