"""How a command is launched: in this process, as N local processes, or as a Slurm job.

``add_launcher_arguments`` puts the flags on any argparse parser (train, distill, eval
verbs share them) and ``options_from_args`` turns the parsed namespace into a validated
``LauncherOptions``.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

LAUNCHERS = ("none", "local", "slurm")


@dataclasses.dataclass(kw_only=True)
class LauncherOptions:
    launcher: str = "none"
    nproc: int = 1                   # processes per node for "local", tasks per node on CPU Slurm
    nodes: int = 1
    gpus_per_node: int = 0           # 0: CPU job (tasks per node = nproc)
    partition: str | None = None
    timeout_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    signal_delay_s: int = 120        # preemption/timeout signal this long before the time limit
    max_requeues: int = 3            # total restarts (preemptions + timeouts) before giving up
    job_name: str = "dinov2_repro"
    slurm_output_dir: str = "slurm_logs/%j"  # submitit folder; %j becomes the job id
    extra_slurm: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher={self.launcher!r} unknown; choose one of {LAUNCHERS}")
        for key in ("nproc", "nodes", "timeout_min"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r} must be >= 1")
        for key in ("gpus_per_node", "signal_delay_s", "max_requeues"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be >= 0")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"cpus_per_task={self.cpus_per_task!r} must be >= 1")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ValueError(f"mem_gb={self.mem_gb!r} must be > 0")
        if self.launcher == "local" and self.nodes != 1:
            raise ValueError(f"launcher 'local' runs on this machine only, but nodes={self.nodes}")
        if self.launcher == "slurm" and self.signal_delay_s >= self.timeout_min * 60:
            raise ValueError(f"signal_delay_s={self.signal_delay_s} must be shorter than the time limit "
                             f"({self.timeout_min} min): the job would be signalled before it starts")
        if not self.job_name:
            raise ValueError("job_name must not be empty")
        if not self.slurm_output_dir:
            raise ValueError("slurm_output_dir must not be empty")

    @property
    def tasks_per_node(self) -> int:
        """One task per GPU on GPU nodes, ``nproc`` tasks on CPU nodes."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.nproc

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def add_launcher_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the launcher flags (in their own argument group) to ``parser``."""
    d = LauncherOptions()
    group = parser.add_argument_group("launcher")
    group.add_argument("--launcher", choices=LAUNCHERS, default=d.launcher,
                       help="none: run in this process; local: --nproc processes here; slurm: submit with submitit")
    group.add_argument("--nproc", type=int, default=d.nproc, help="processes per node (local, or CPU Slurm jobs)")
    group.add_argument("--nodes", type=int, default=d.nodes, help="Slurm nodes")
    group.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help="GPUs (= tasks) per node; 0 on CPU")
    group.add_argument("--partition", default=d.partition, help="Slurm partition")
    group.add_argument("--timeout", dest="timeout_min", type=int, default=d.timeout_min, help="time limit in minutes")
    group.add_argument("--account", default=d.account, help="Slurm account")
    group.add_argument("--qos", default=d.qos, help="Slurm quality of service")
    group.add_argument("--constraint", default=d.constraint, help="Slurm node constraint")
    group.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task, help="CPUs per task")
    group.add_argument("--mem-gb", type=float, default=d.mem_gb, help="memory per node in GB")
    group.add_argument("--signal-delay-s", type=int, default=d.signal_delay_s,
                       help="seconds before the time limit at which the job is told to checkpoint and requeue")
    group.add_argument("--max-requeues", type=int, default=d.max_requeues,
                       help="how many times a preempted or timed-out job is requeued")
    group.add_argument("--job-name", default=d.job_name, help="Slurm job name")
    group.add_argument("--slurm-output-dir", default=d.slurm_output_dir,
                       help="folder for submitit pickles and Slurm logs; %%j is replaced by the job id")
    group.add_argument("--slurm-extra", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="extra sbatch option, e.g. --slurm-extra exclusive= or --slurm-extra mail-type=END")
    group.add_argument("--dry-run", action="store_true",
                       help="print what would be launched (submitit parameters) and the plan; launch nothing")
    group.add_argument("--plan-gpu", default="a100-80gb",
                       help="GPU model the --dry-run plan assumes (see `dinov2-repro plan -h`)")
    group.add_argument("--plan-mfu", type=float, default=None,
                       help="MFU of the --dry-run plan (default: implied by the paper's ViT-g A100-hours)")
    return parser


def options_from_args(args: argparse.Namespace) -> LauncherOptions:
    """Build validated options from a namespace parsed with ``add_launcher_arguments``."""
    missing = [k for k in ("launcher", "nproc", "timeout_min", "slurm_output_dir") if not hasattr(args, k)]
    if missing:
        raise ValueError(f"namespace lacks launcher arguments {missing}: call add_launcher_arguments(parser) first")
    # "--slurm-extra exclusive=" means a bare flag (#SBATCH --exclusive).
    extra = {key: (value if value != "" else True) for key, value in getattr(args, "slurm_extra", [])}
    return LauncherOptions(
        launcher=args.launcher, nproc=args.nproc, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        partition=args.partition, timeout_min=args.timeout_min, account=args.account, qos=args.qos,
        constraint=args.constraint, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
        signal_delay_s=args.signal_delay_s, max_requeues=args.max_requeues, job_name=args.job_name,
        slurm_output_dir=args.slurm_output_dir, extra_slurm=extra,
    )
