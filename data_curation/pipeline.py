"""The curation stages (units.py) in pipeline order, and running them in this process.

Each stage is a ``StageUnit`` (stages_pool.py, stages_dedup.py, stages_select.py); runner.py
runs the same units as local processes or Slurm job arrays. ``run_stage(cfg, stage,
num_shards=N)`` runs every shard here, one after the other: the result is the same for every N.
"""
from __future__ import annotations

import logging

from omegaconf import DictConfig

from .fingerprint import record_stage, require_fresh  # noqa: F401  (re-exported)
from .paths import (current_selection, embedding_sets, out, pool_manifest, read_selected, setup_threads,  # noqa: F401
                    sscd_checkpoint, write_selected)
from .stages_dedup import DEDUP
from .stages_pool import EMBED, TILE
from .stages_select import CLUSTER, EXPORT, RETRIEVE, SAMPLE, SELECTION_STAGES
from .units import StageUnit, run_task

log = logging.getLogger(__name__)

UNITS: dict[str, StageUnit] = {u.name: u for u in (TILE, EMBED, DEDUP, RETRIEVE, CLUSTER, SAMPLE, EXPORT)}
PIPELINE = list(UNITS)
STAGES = UNITS


def stage_inputs(cfg: DictConfig, stage: str) -> list[str]:
    """The stages whose outputs ``stage`` reads (their digests go into its stage record)."""
    return UNITS[stage].inputs(cfg)


def check_inputs_fresh(cfg: DictConfig, stage: str) -> None:
    """A stage must not build on a stale selection; export refuses to combine selections made from
    other inputs or settings than the current ones (it checks the whole chain)."""
    inputs = stage_inputs(cfg, stage)
    require_fresh(cfg, inputs if stage == "export" else [s for s in inputs if s in SELECTION_STAGES], by=stage)


def run_stage(cfg: DictConfig, stage: str, *, num_shards: int = 1) -> None:
    """Run ``stage`` (or ``all``) in this process, every shard of every phase in turn."""
    from .config import save_resolved

    if stage not in UNITS and stage != "all":
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(PIPELINE)}, all")
    setup_threads(cfg)
    save_resolved(cfg, cfg.output_dir)
    for name in PIPELINE if stage == "all" else [stage]:
        log.info("curate: stage %s (%d shard(s))", name, num_shards)
        check_inputs_fresh(cfg, name)
        unit = UNITS[name]
        for phase in unit.phase_list(cfg):
            for shard in range(num_shards if phase.sharded else 1):
                run_task(cfg, unit, phase.name, shard, num_shards)
