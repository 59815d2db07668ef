"""Submit a command to Slurm through submitit, with preemption/timeout requeue and resume.

Slurm starts one task per rank (``nodes x tasks_per_node``); each task runs
``CommandJob``, which runs the Python command line *in the task's own process*
(``runpy``, exactly what ``python -m module ...`` / ``python script.py ...`` would do),
and the command joins the process group itself via ``detect_env``/``init_distributed``.

Why in-process rather than a subprocess: submitit's preemption protocol lives in the
process that runs the callable. It ignores SIGTERM (Slurm sends it before the preemption
signal) and, on the job's signal (USR2), calls ``CommandJob.checkpoint`` on rank 0,
requeues the job and exits. In-process, the training is covered by exactly that
protocol. A subprocess would receive Slurm's SIGTERM itself (Slurm signals every process
of the step), die before USR2 arrives, and the wrapper would report a failure instead
of requeueing; making that work needs signal forwarding and races that in-process
avoids. The job state lives in checkpoints on disk, so ``checkpoint`` only has to
resubmit the resume command line (``<output_dir>/checkpoints/last`` contract).

Caveat for the training loop: forked DataLoader workers inherit submitit's Python
signal handlers; a ``worker_init_fn`` should reset SIGUSR2/SIGTERM to SIG_IGN there.
"""
from __future__ import annotations

import logging
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from dinov2_repro.launch.options import LauncherOptions

logger = logging.getLogger(__name__)

# Set by the submitting shell, meaningless (and misleading for detect_env) inside a Slurm task.
_STALE_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK", "DINOV2_LAUNCHER")
_PYTHON_NOOP_FLAGS = ("-u", "-B")  # unbuffered output / no .pyc: irrelevant in-process
DEFAULT_JOB_ENV = {"OMP_NUM_THREADS": "1"}


def parse_python_command(argv: Sequence[str]) -> tuple[str, str, list[str]]:
    """Split ``[python, (-u|-B)*, -m module | script.py, *args]`` into (kind, target, args).

    kind is "module" or "script". Anything else is rejected: CommandJob runs Python
    entry points in-process (see the module doc).
    """
    argv = [str(a) for a in argv]
    if not argv or not Path(argv[0]).name.startswith("python"):
        raise ValueError(f"Slurm command must be a full Python command line, e.g. "
                         f"[sys.executable, '-m', 'dinov2_repro.cli', *args]; got {argv[:4]}")
    i = 1
    while i < len(argv) and argv[i] in _PYTHON_NOOP_FLAGS:
        i += 1
    if i >= len(argv):
        raise ValueError(f"Slurm command {argv} names no module or script")
    if argv[i] == "-m":
        if i + 1 >= len(argv):
            raise ValueError(f"Slurm command {argv}: -m without a module name")
        return "module", argv[i + 1], argv[i + 2:]
    if argv[i].startswith("-"):
        raise ValueError(f"Slurm command {argv}: interpreter option {argv[i]!r} is not supported in-process")
    return "script", argv[i], argv[i + 1:]


class CommandJob:
    """Picklable submitit callable: runs a Python command line in-process, resumable on requeue."""

    def __init__(self, *, argv: Sequence[str], workdir: str | os.PathLike, resume_argv: Sequence[str] | None = None,
                 max_requeues: int = 3) -> None:
        self.argv = [str(a) for a in argv]
        self.resume_argv = [str(a) for a in resume_argv] if resume_argv is not None else list(self.argv)
        parse_python_command(self.argv)  # fail at submission time, not on the cluster
        parse_python_command(self.resume_argv)
        self.workdir = str(Path(workdir).resolve())
        self.max_requeues = max_requeues
        self._preempted = False

    def __call__(self) -> int:
        kind, target, args = parse_python_command(self.argv)
        for key in _STALE_LAUNCH_VARS:
            os.environ.pop(key, None)
        os.chdir(self.workdir)
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"[CommandJob] job={os.environ.get('SLURM_JOB_ID')} task={os.environ.get('SLURM_PROCID')} "
              f"restart={restart} cwd={self.workdir} running: {shlex.join(self.argv)}", flush=True)
        old_argv, old_path = list(sys.argv), list(sys.path)
        try:
            if kind == "module":
                sys.argv = [target, *args]
                sys.path.insert(0, self.workdir)  # like `python -m`, which puts the cwd first
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                script = str(Path(self.workdir, target))
                sys.argv = [script, *args]
                sys.path.insert(0, str(Path(script).parent))
                runpy.run_path(script, run_name="__main__")
        except SystemExit as exit_:
            if self._preempted:
                raise  # submitit's own exit after requeueing: the job is not over
            code = exit_.code
            if code not in (0, None):
                # A plain SystemExit would skip submitit's result file and leave the job's
                # submitter waiting forever (no sacct here); an exception records the failure.
                raise RuntimeError(f"command {shlex.join(self.argv)} exited with status {code!r}") from None
        finally:
            sys.argv, sys.path[:] = old_argv, old_path
        return 0

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on rank 0 when the job is preempted or times out."""
        import submitit

        self._preempted = True
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts >= self.max_requeues:
            print(f"[CommandJob] not requeueing: already restarted {restarts} times (max_requeues={self.max_requeues})",
                  flush=True)
            return None
        print(f"[CommandJob] requeueing (restart {restarts + 1}/{self.max_requeues}) with: "
              f"{shlex.join(self.resume_argv)}", flush=True)
        resumed = CommandJob(argv=self.resume_argv, workdir=self.workdir, resume_argv=self.resume_argv,
                             max_requeues=self.max_requeues)
        return submitit.helpers.DelayedSubmission(resumed, *args, **kwargs)


def slurm_parameters(options: LauncherOptions, *, workdir: str | os.PathLike,
                     job_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """submitit ``update_parameters`` keywords for ``options`` (pure; testable without Slurm).

    ``job_env`` is exported in the batch script before srun, on top of OMP_NUM_THREADS=1.
    """
    env = {**DEFAULT_JOB_ENV, **(job_env or {})}
    params: dict[str, Any] = {
        "name": options.job_name,
        "nodes": options.nodes,
        "tasks_per_node": options.tasks_per_node,
        "timeout_min": options.timeout_min,
        "slurm_signal_delay_s": options.signal_delay_s,
        "slurm_setup": [f"export {key}={shlex.quote(str(value))}" for key, value in env.items()],
        # --requeue: allowed to requeue even where JobRequeue=0, and on node failure.
        "slurm_additional_parameters": {"chdir": str(Path(workdir).resolve()), "requeue": True,
                                        **options.extra_slurm},
    }
    if options.gpus_per_node > 0:  # CPU clusters may have no GPU gres at all: do not ask
        params["gpus_per_node"] = options.gpus_per_node
    optional = {"cpus_per_task": options.cpus_per_task, "mem_gb": options.mem_gb,
                "slurm_partition": options.partition, "slurm_account": options.account,
                "slurm_qos": options.qos, "slurm_constraint": options.constraint}
    params.update({key: value for key, value in optional.items() if value is not None})
    return params


def submit_slurm(cmd_argv: Sequence[str], options: LauncherOptions, *, workdir: str | os.PathLike,
                 resume_argv: Sequence[str] | None = None, job_env: Mapping[str, str] | None = None) -> Any:
    """Submit ``cmd_argv`` (``[sys.executable, "-m", ..., *args]``) as a Slurm job; returns the submitit.Job.

    The job runs with this process's interpreter, in ``workdir``; a relative
    ``options.slurm_output_dir`` is taken relative to ``workdir``. On preemption/timeout it
    is requeued with ``resume_argv`` (default: the same command, which resumes from its
    last checkpoint) at most ``options.max_requeues`` times in total.
    """
    import submitit

    workdir = Path(workdir).resolve()
    if not workdir.is_dir():
        raise ValueError(f"workdir {workdir} is not a directory")
    folder = Path(options.slurm_output_dir)
    folder = folder if folder.is_absolute() else workdir / folder
    job = CommandJob(argv=cmd_argv, workdir=workdir, resume_argv=resume_argv, max_requeues=options.max_requeues)
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=options.max_requeues,
                                     slurm_python=shlex.quote(sys.executable))
    executor.update_parameters(**slurm_parameters(options, workdir=workdir, job_env=job_env))
    submitted = executor.submit(job)
    logger.info("submitted Slurm job %s (%d task(s)); logs in %s", submitted.job_id, options.world_size,
                submitted.paths.folder)
    return submitted


def slurm_job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` fields of a job ({} once Slurm forgot it); works without accounting."""
    result = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return {}
    fields: dict[str, str] = {}
    for token in result.stdout.split():
        key, sep, value = token.partition("=")
        if sep:
            fields.setdefault(key, value)
    return fields
