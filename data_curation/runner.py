"""Run curation stages as job arrays: in this process, as local processes, or on Slurm (submitit).

A stage (units.py) is a list of phases; a sharded phase becomes an array of ``--shards`` tasks,
the others one task. Nothing here knows what a phase does.

- ``none``: every task in this process, one after the other.
- ``local``: a sharded phase runs as min(shards, array_parallelism) local processes
  (launch/local.py, the project's local launcher), process r taking shards r, r + P, ...; the
  one-task phases run in this process, after the array finished (waiting in between).
- ``slurm``: every phase is a submitit job array (``map_array``, ``slurm_array_parallelism``);
  each phase depends on the previous one (``--dependency=afterok``), so ``curate all`` submits the
  whole chain at once and returns. A preempted or requeued task reruns only its unfinished items.

The tasks read the resolved config from ``<output_dir>/runner/config-<digest>.yaml``: every task
of a submission sees the same config, whatever the files and environment look like later.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from dinov2_repro.launch.options import LauncherOptions

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ArrayJob:
    """One phase of one stage: ``tasks`` tasks (1 for a one-task phase)."""

    stage: str
    phase: str
    tasks: int


def plan_jobs(stages: Sequence[str], num_shards: int, cfg: DictConfig) -> list[ArrayJob]:
    from .pipeline import UNITS

    return [ArrayJob(stage, phase.name, num_shards if phase.sharded else 1) for stage in stages
            for phase in UNITS[stage].phase_list(cfg)]


def frozen_config(cfg: DictConfig) -> Path:
    """Write the resolved config where the tasks read it; returns its path."""
    from .io import atomic_write_text

    text = OmegaConf.to_yaml(cfg, resolve=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = Path(cfg.output_dir).resolve() / "runner" / f"config-{digest}.yaml"
    if not path.is_file():
        atomic_write_text(path, text)
    return path


def execute(config_path: str | os.PathLike, stage: str, phase: str, shards: Sequence[int], num_shards: int,
            threads: int | None = None) -> None:
    """Run the given shards of one phase in this process (what every task does)."""
    from .config import save_resolved
    from .paths import setup_threads
    from .pipeline import UNITS, check_inputs_fresh
    from .units import run_task

    cfg = OmegaConf.load(config_path)
    if threads:
        cfg.num_threads = threads
    unit = UNITS[stage]
    setup_threads(cfg)
    if phase == unit.phase_list(cfg)[0].name:
        check_inputs_fresh(cfg, stage)
        save_resolved(cfg, cfg.output_dir)
    for shard in shards:
        run_task(cfg, unit, phase, shard, num_shards)


class CurationTask:
    """Picklable submitit callable: one task of a phase (``shard`` given by map_array)."""

    def __init__(self, *, config_path: str, stage: str, phase: str, num_shards: int) -> None:
        self.config_path, self.stage, self.phase, self.num_shards = str(config_path), stage, phase, num_shards

    def __call__(self, shard: int = 0) -> str:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        print(f"[curate] {self.stage}/{self.phase} shard {shard}/{self.num_shards} job={os.environ.get('SLURM_JOB_ID')} "
              f"restart={os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)
        execute(self.config_path, self.stage, self.phase, [shard], self.num_shards)
        return f"{self.stage}/{self.phase}[{shard}]"

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Preempted or timed out: requeue the same task; finished items are kept on disk."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def task_command(config_path: Path, job: ArrayJob, num_shards: int) -> list[str]:
    """The command of one local worker process (it takes shards rank, rank + world, ... itself)."""
    return [sys.executable, "-m", "dinov2_repro.curation.runner", str(config_path), job.stage, job.phase, str(num_shards)]


def slurm_params(options: LauncherOptions, *, array_parallelism: int, after: str | None) -> dict[str, Any]:
    from dinov2_repro.launch.slurm import slurm_parameters

    params = slurm_parameters(options, workdir=os.getcwd())
    params["tasks_per_node"], params["nodes"] = 1, 1  # one process per task: the array is the parallelism
    params["slurm_array_parallelism"] = array_parallelism
    if after:
        params["slurm_additional_parameters"] = {**params["slurm_additional_parameters"], "dependency": f"afterok:{after}"}
    return params


def run(cfg: DictConfig, stages: Sequence[str], *, launcher: str, num_shards: int, array_parallelism: int | None = None,
        options: LauncherOptions | None = None, dry_run: bool = False, stream=None) -> list:
    """Run (or, with ``dry_run``, print) ``stages`` as job arrays; returns the submitit jobs (slurm)."""
    stream = stream or sys.stdout
    parallelism = min(num_shards, array_parallelism or num_shards)
    jobs = plan_jobs(stages, num_shards, cfg)
    config_path = frozen_config(cfg) if not dry_run else Path(cfg.output_dir).resolve() / "runner" / "config-<digest>.yaml"
    options = options or LauncherOptions(launcher=launcher)
    if dry_run:
        for n, job in enumerate(jobs):
            entry = {"job": n, "stage": job.stage, "phase": job.phase, "tasks": job.tasks, "launcher": launcher,
                     "array_parallelism": min(parallelism, job.tasks), "after": n - 1 if n else None}
            if launcher == "slurm":
                entry["submitit_parameters"] = slurm_params(options, array_parallelism=min(parallelism, job.tasks),
                                                            after="<job %d>" % (n - 1) if n else None)
            elif launcher == "local" and job.tasks > 1:
                entry["processes"] = min(parallelism, job.tasks)
                entry["command"] = shlex.join(task_command(config_path, job, num_shards))
            print(json.dumps(entry), file=stream)
        return []
    if launcher == "slurm":
        return _submit_slurm(config_path, jobs, num_shards, parallelism, options, stream)
    for job in jobs:
        if launcher == "local" and job.tasks > 1:
            from dinov2_repro.launch.local import run_local

            procs = min(parallelism, job.tasks)
            # Each process gets its share of the threads (num_threads is not part of any fingerprint).
            code = run_local(task_command(config_path, job, num_shards), nproc=procs,
                             env={"DATA_CURATION_THREADS": str(max(1, int(cfg.num_threads) // procs))})
            if code != 0:
                raise RuntimeError(f"curate {job.stage}: phase {job.phase} failed (exit {code}); run the same "
                                   f"command again: finished shards and items are kept and skipped")
        else:
            execute(config_path, job.stage, job.phase, range(job.tasks), num_shards)
    return []


def _submit_slurm(config_path: Path, jobs: list[ArrayJob], num_shards: int, parallelism: int,
                  options: LauncherOptions, stream) -> list:
    import submitit

    folder = Path(options.slurm_output_dir)
    folder = folder if folder.is_absolute() else Path.cwd() / folder
    submitted, after = [], None
    for job in jobs:
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=options.max_requeues,
                                         slurm_python=shlex.quote(sys.executable))
        executor.update_parameters(**slurm_params(options, array_parallelism=min(parallelism, job.tasks), after=after))
        task = CurationTask(config_path=str(config_path), stage=job.stage, phase=job.phase, num_shards=num_shards)
        array = executor.map_array(task, list(range(job.tasks)))
        after = array[0].job_id.split("_")[0]
        print(f"submitted {job.stage}/{job.phase}: Slurm job {after} ({job.tasks} task(s))", file=stream, flush=True)
        submitted.append(array)
    return submitted


def main(argv: Sequence[str] | None = None) -> int:
    """Local worker process: ``python -m dinov2_repro.curation.runner CONFIG STAGE PHASE NUM_SHARDS``
    (rank and world size from launch/local.py's RANK / WORLD_SIZE)."""
    config_path, stage, phase, num_shards = (sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    threads = int(os.environ.get("DATA_CURATION_THREADS", "0")) or None
    execute(config_path, stage, phase, range(rank, int(num_shards), world), int(num_shards), threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
