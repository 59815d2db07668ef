"""Curation stages as units: a stage is a list of phases; a phase is one task (a preparation or a
merge) or N shards. Each phase function runs ONE task (``ShardContext``) and writes its outputs
atomically; the runner (runner.py: in this process, local processes, a Slurm job array) knows
nothing of what the phases do.

Identical results for every N: a sharded phase splits its work into items fixed by the config
(rows per embedding shard, database rows per kNN shard, pairs by a stable hash), never by N;
shard i of N takes the items ``i, i + N, ...``. Items and shards are skipped when their output
exists, so a killed or requeued shard recomputes only what it had not finished. Per-shard
outputs live under ``<stage>/work/<fingerprint>/`` where the fingerprint covers the stage's config
sections, its inputs' output digests and the shard count: outputs of other settings are never reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from omegaconf import DictConfig

from .fingerprint import config_digest, output_digest, record_path
from .io import atomic_write_json, read_json

log = logging.getLogger(__name__)

# Test hook: "STAGE:PHASE:SHARD" -> that shard fails after its first item (as a killed shard would).
FAIL_SHARD_ENV = "DATA_CURATION_TEST_FAIL_SHARD"


class SimulatedFailure(RuntimeError):
    """Raised by the FAIL_SHARD_ENV test hook."""


@dataclass(frozen=True)
class ShardContext:
    """What one task of a phase gets: the config, which shard of how many, and its folders."""

    cfg: DictConfig
    stage: str
    phase: str
    shard: int
    num_shards: int
    work: Path  # <output_dir>/<stage>/work/<fingerprint>

    @property
    def phase_dir(self) -> Path:
        path = self.work / self.phase
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mine(self, items: Sequence) -> list:
        """This shard's items: i, i + N, i + 2N, ... (items are fixed by the config, not by N)."""
        return [item for j, item in enumerate(items) if j % self.num_shards == self.shard]

    def item_path(self, j: int, *, phase: str | None = None, suffix: str = ".npz") -> Path:
        """The output file of item ``j`` of ``phase`` (default: this task's phase)."""
        folder = self.phase_dir if phase is None else self.work / phase
        return folder / f"item_{j:05d}{suffix}"

    def pending(self, items: Sequence, *, suffix: str = ".npz") -> list[tuple[int, object]]:
        """This shard's ``(j, item)`` whose output is not written yet: a rerun skips finished items."""
        return [(j, item) for j, item in self.mine(list(enumerate(items))) if not self.item_path(j, suffix=suffix).is_file()]

    def finished_items(self, phase: str, num_items: int, *, suffix: str = ".npz") -> list[Path]:
        """The outputs of all ``num_items`` items of ``phase`` (what a merge reads); one line naming
        the missing ones otherwise."""
        paths = [self.item_path(j, phase=phase, suffix=suffix) for j in range(num_items)]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise RuntimeError(f"{self.stage}: {phase} items {missing[:3]} missing under {self.work / phase}; "
                               f"re-run the {phase} shards")
        return paths

    def item_done(self) -> None:
        """Call after each item: the test hook that simulates a shard killed partway."""
        if os.environ.get(FAIL_SHARD_ENV) == f"{self.stage}:{self.phase}:{self.shard}":
            raise SimulatedFailure(f"{self.label}: test hook {FAIL_SHARD_ENV}: failing after one item")

    @property
    def label(self) -> str:
        return f"{self.stage}/{self.phase}[{self.shard}/{self.num_shards}]"


@dataclass(frozen=True)
class Phase:
    """``fn(ctx)`` runs one task; ``sharded`` phases run as N tasks, the others as one."""

    name: str
    fn: Callable[[ShardContext], None]
    sharded: bool = False


@dataclass(frozen=True)
class StageUnit:
    """A curation stage: its phases in order, the stages whose outputs it reads (``inputs``),
    its output files (fingerprint.output_files) and the config sections it depends on
    (fingerprint.STAGE_CONFIG). ``phases`` is a tuple, or a function of the config for a stage
    whose phase list depends on it (cluster: one assign/refit pair per resampling step)."""

    name: str
    phases: tuple[Phase, ...] | Callable[[DictConfig], tuple[Phase, ...]]
    inputs: Callable[[DictConfig], list[str]] = field(default=lambda cfg: [])

    def phase_list(self, cfg: DictConfig) -> tuple[Phase, ...]:
        """The stage's phases, in order, under ``cfg``."""
        return tuple(self.phases(cfg)) if callable(self.phases) else self.phases

    def phase(self, name: str, cfg: DictConfig) -> Phase:
        phases = self.phase_list(cfg)
        for phase in phases:
            if phase.name == name:
                return phase
        raise ValueError(f"stage {self.name} has no phase {name!r} (phases: {[p.name for p in phases]})")


def input_digest(cfg: DictConfig, stage: str) -> str | None:
    """An input stage's output digest: from its stage record when it has one (no re-hashing of
    large outputs in every task), else from the files."""
    path = record_path(cfg, stage)
    if path.is_file():
        return read_json(path).get("output")
    return output_digest(cfg, stage)


def fingerprint(cfg: DictConfig, unit: StageUnit, num_shards: int) -> str:
    """Digest of the stage's config sections, its inputs' outputs and the shard count."""
    spec = {"stage": unit.name, "config": config_digest(cfg, unit.name),
            "inputs": {name: input_digest(cfg, name) for name in unit.inputs(cfg)}, "num_shards": int(num_shards)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def work_dir(cfg: DictConfig, unit: StageUnit, num_shards: int) -> Path:
    return Path(cfg.output_dir) / unit.name / "work" / fingerprint(cfg, unit, num_shards)


def marker(ctx: ShardContext) -> Path:
    return ctx.work / "done" / f"{ctx.phase}.{ctx.shard:05d}-of-{ctx.num_shards:05d}.json"


def run_task(cfg: DictConfig, unit: StageUnit, phase_name: str, shard: int, num_shards: int) -> bool:
    """Run one task of a phase unless its completion marker exists; True when it ran."""
    phase = unit.phase(phase_name, cfg)
    if not 0 <= shard < (num_shards if phase.sharded else 1):
        raise ValueError(f"{unit.name}/{phase_name}: shard {shard} out of range (num_shards {num_shards})")
    ctx = ShardContext(cfg=cfg, stage=unit.name, phase=phase_name, shard=shard, num_shards=num_shards if phase.sharded else 1,
                       work=work_dir(cfg, unit, num_shards))
    done = marker(ctx)
    if done.is_file():
        log.info("%s: complete, skipped", ctx.label)
        return False
    start = time.time()
    log.info("%s: running (work dir %s)", ctx.label, ctx.work)
    phase.fn(ctx)
    import resource

    # Peak resident memory of this process so far (Linux: KiB): what a Slurm task must be given.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    atomic_write_json(done, {"seconds": round(time.time() - start, 2), "host": os.uname().nodename,
                             "slurm_job": os.environ.get("SLURM_JOB_ID"), "pid": os.getpid(),
                             "peak_rss_mb": round(peak_mb, 1)})
    log.info("%s: done in %.1fs", ctx.label, time.time() - start)
    return True


def remove_other_work(ctx: ShardContext) -> None:
    """After the final merge: per-shard outputs of other settings are of no further use."""
    if not ctx.work.parent.is_dir():
        return
    for other in ctx.work.parent.iterdir():
        if other != ctx.work and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def stable_bucket(src: np.ndarray, dst: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each pair (src, dst) in [0, buckets): a fixed integer hash, the same in every
    process and Python run (unlike hash())."""
    h = (np.asarray(src, np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (np.asarray(dst, np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
    h ^= h >> np.uint64(29)
    return (h % np.uint64(buckets)).astype(np.int64)
