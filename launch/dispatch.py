"""Route a CLI verb to the chosen launcher: N local processes or a Slurm job."""
from __future__ import annotations

import os
import sys
from typing import Sequence

from .options import LauncherOptions


def describe_launch(child_argv: Sequence[str], options: LauncherOptions) -> dict:
    """What ``launch_command`` would do, without doing it (``--dry-run``)."""
    argv = [sys.executable, "-m", "dinov2_repro.cli", *child_argv]
    if options.launcher == "slurm":
        from .slurm import slurm_parameters

        return {"launcher": "slurm", "command": argv, "world_size": options.world_size,
                "max_requeues": options.max_requeues, "slurm_output_dir": options.slurm_output_dir,
                "submitit_parameters": slurm_parameters(options, workdir=os.getcwd())}
    if options.launcher == "local":
        return {"launcher": "local", "command": argv, "nproc": options.nproc, "world_size": options.nproc}
    return {"launcher": "none", "command": argv, "world_size": 1}


def launch_command(child_argv: Sequence[str], options: LauncherOptions) -> int:
    """Run ``dinov2-repro <child_argv>`` (already stripped of launcher flags) under ``options``."""
    if options.launcher == "local":
        from .local import run_local

        return run_local([sys.executable, "-m", "dinov2_repro.cli", *child_argv], nproc=options.nproc)
    if options.launcher == "slurm":
        from .slurm import submit_slurm

        job = submit_slurm([sys.executable, "-m", "dinov2_repro.cli", *child_argv], options, workdir=os.getcwd())
        print(f"submitted Slurm job {job.job_id} ({options.world_size} tasks); "
              f"logs: {str(options.slurm_output_dir).replace('%j', str(job.job_id))}")
        return 0
    raise ValueError(f"launcher {options.launcher!r} does not dispatch; run the verb in-process")
