"""Where this process sits in a distributed job, and the default process group.

Sources, in order of precedence (``detect_env``):

1. **Slurm** task (``srun``/submitit): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
   SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE, the first host of the step/job node
   list as master address and a master port derived from SLURM_JOB_ID (every task of
   the job computes the same one without talking to the others).
2. **torchrun** (or ``dinov2_repro.launch.local.run_local``): RANK, WORLD_SIZE, LOCAL_RANK,
   LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
3. **single** process.

When both Slurm and torchrun variables are present, torchrun's win if the Slurm
allocation has a single task (torchrun started inside a one-task job/step spawned the
ranks itself), or if a launcher inside the Slurm task says it set them
(TORCHELASTIC_RUN_ID from torchrun, DINOV2_LAUNCHER=local from run_local). Otherwise
Slurm's win: torchrun variables in a multi-task Slurm step are leftovers exported from
the submitting shell (sbatch forwards the whole environment).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
from pathlib import Path
from typing import Literal, Mapping

import torch
import torch.distributed as dist

from .slurm_nodes import expand_tasks_per_node, first_host, parse_nodelist  # noqa: F401  (re-exported)

Source = Literal["slurm", "torchrun", "single"]

# Slurm master ports live below Linux's ephemeral range (32768-60999) so that they do
# not collide with ports the kernel hands out to outgoing connections.
SLURM_PORT_BASE = 12000
SLURM_PORT_SPAN = 20000
DEFAULT_TIMEOUT_S = 1800.0
LOCAL_LAUNCHER_VAR = "DINOV2_LAUNCHER"

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: Source

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --------------------------------------------------------------------------- detection
def _int_var(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = environ.get(key)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {key} is required but not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def slurm_master_port(job_id: int) -> int:
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _has_slurm_task(environ: Mapping[str, str]) -> bool:
    return "SLURM_PROCID" in environ and ("SLURM_NTASKS" in environ or "SLURM_NPROCS" in environ)


def _torchrun_wins_in_slurm(environ: Mapping[str, str]) -> bool:
    ntasks = _int_var(environ, "SLURM_NTASKS", _int_var(environ, "SLURM_NPROCS", 1))
    return ntasks == 1 or "TORCHELASTIC_RUN_ID" in environ or environ.get(LOCAL_LAUNCHER_VAR) == "local"


def _from_slurm(environ: Mapping[str, str]) -> DistributedEnv:
    world_size = _int_var(environ, "SLURM_NTASKS", _int_var(environ, "SLURM_NPROCS", 1))
    rank = _int_var(environ, "SLURM_PROCID")
    local_rank = _int_var(environ, "SLURM_LOCALID", 0)
    if "SLURM_NTASKS_PER_NODE" in environ:
        local_world_size = _int_var(environ, "SLURM_NTASKS_PER_NODE")
    elif environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE"):
        key = "SLURM_STEP_TASKS_PER_NODE" if environ.get("SLURM_STEP_TASKS_PER_NODE") else "SLURM_TASKS_PER_NODE"
        per_node = expand_tasks_per_node(environ[key])
        node_id = _int_var(environ, "SLURM_NODEID", 0)
        if node_id >= len(per_node):
            raise ValueError(f"SLURM_NODEID={node_id} but {key}={environ[key]!r} lists {len(per_node)} nodes")
        local_world_size = per_node[node_id]
    else:
        local_world_size = world_size // max(1, _int_var(environ, "SLURM_JOB_NUM_NODES", 1))
    nodelist_key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if environ.get(k)), None)
    if nodelist_key is None:
        if world_size > 1:
            raise ValueError("Slurm task with SLURM_NTASKS > 1 but no SLURM_JOB_NODELIST/SLURM_NODELIST: cannot find the master host")
        master_addr = "127.0.0.1"
    else:
        master_addr = first_host(environ[nodelist_key])
    master_port = slurm_master_port(_int_var(environ, "SLURM_JOB_ID", 0))
    return DistributedEnv(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size,
                          master_addr=master_addr, master_port=master_port, source="slurm")


def _from_torchrun(environ: Mapping[str, str]) -> DistributedEnv:
    world_size = _int_var(environ, "WORLD_SIZE")
    rank = _int_var(environ, "RANK")
    master_addr = environ.get("MASTER_ADDR", "")
    if not master_addr:
        if world_size > 1:
            raise ValueError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set")
        master_addr = "127.0.0.1"
    master_port = _int_var(environ, "MASTER_PORT", None if world_size > 1 else 0)
    return DistributedEnv(rank=rank, world_size=world_size, local_rank=_int_var(environ, "LOCAL_RANK", rank),
                          local_world_size=_int_var(environ, "LOCAL_WORLD_SIZE", world_size),
                          master_addr=master_addr, master_port=master_port, source="torchrun")


def detect_env(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """Read rank and world layout from ``environ`` (default: ``os.environ``); see the module doc."""
    environ = os.environ if environ is None else environ
    has_torchrun = "WORLD_SIZE" in environ and "RANK" in environ
    if _has_slurm_task(environ) and not (has_torchrun and _torchrun_wins_in_slurm(environ)):
        env = _from_slurm(environ)
    elif has_torchrun:
        env = _from_torchrun(environ)
    else:
        env = DistributedEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                             master_port=_int_var(environ, "MASTER_PORT", 0), source="single")
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"invalid {env.source} layout: rank={env.rank} world_size={env.world_size}")
    if env.local_world_size < 1 or not 0 <= env.local_rank < env.local_world_size:
        raise ValueError(f"invalid {env.source} layout: local_rank={env.local_rank} local_world_size={env.local_world_size}")
    if not 0 <= env.master_port < 65536:
        raise ValueError(f"invalid {env.source} master port {env.master_port}")
    return env


# --------------------------------------------------------------------------- process group
_STATE: dict[str, object] = {}


def choose_backend(*, cuda_available: bool) -> str:
    """NCCL when the ranks drive GPUs, gloo on CPU (NCCL has no CPU tensors)."""
    return "nccl" if cuda_available else "gloo"


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now: the rendezvous port of a new job.

    Taken below the kernel's ephemeral range: a port the OS picks (bind to 0) comes from the range
    it also hands to outgoing connections, and gloo opens many of those, so one of them could take
    the port in the seconds before the ranks bind it (seen as EADDRINUSE in the suite)."""
    import random
    import socket

    low, _ = _ephemeral_port_range()
    picker = random.SystemRandom()  # leaves the seeded global RNG alone
    for _ in range(200):
        port = picker.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _select_cuda_device(env: DistributedEnv) -> int:
    count = torch.cuda.device_count()
    if count >= env.local_world_size:
        device = env.local_rank
    elif count == 1:
        device = 0  # Slurm bound one GPU to each task (--gpus-per-task / --gpu-bind)
    else:
        raise RuntimeError(f"{env.local_world_size} ranks on this node but only {count} visible CUDA devices")
    torch.cuda.set_device(device)
    return device


def init_distributed(*, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     force_process_group: bool = False, environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """Detect the layout, export the variables torch's ``env://`` needs, and join the job.

    A process group is created when world_size > 1, or with ``force_process_group=True``
    for a single process (code paths that always call collectives). A single process
    without it is fine: the helpers below answer rank 0 / world 1 and barrier() is a no-op.
    ``backend=None`` picks NCCL when CUDA is available (and sets this rank's device from
    local_rank), gloo otherwise. Calling it again returns the first result.
    """
    if "env" in _STATE:
        return _STATE["env"]  # type: ignore[return-value]
    env = detect_env(environ)
    cuda = torch.cuda.is_available()
    backend = backend or choose_backend(cuda_available=cuda)
    joins = env.world_size > 1 or force_process_group
    if joins:
        if env.master_port == 0:
            env = dataclasses.replace(env, master_port=find_free_port())
        # Exported only for a group we join, and restored by shutdown_distributed: left behind in a
        # single process, RANK/WORLD_SIZE/MASTER_PORT made every later run in it (and every child
        # it started) look like a torchrun rank bound to a port that was no longer ours.
        exported = {"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
                    "LOCAL_WORLD_SIZE": str(env.local_world_size), "MASTER_ADDR": env.master_addr,
                    "MASTER_PORT": str(env.master_port)}
        _STATE["saved_environ"] = {key: os.environ.get(key) for key in exported}
        os.environ.update(exported)
    if "nccl" in backend:
        if not cuda:
            raise RuntimeError(f"backend {backend!r} needs CUDA, but torch.cuda.is_available() is False")
        _select_cuda_device(env)
    if joins and not dist.is_initialized():
        logger.info("joining process group: backend=%s rank=%d/%d master=%s:%d (from %s)", backend, env.rank,
                    env.world_size, env.master_addr, env.master_port, env.source)
        dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    _STATE.update(env=env, backend=backend)
    return env


SHUTDOWN_BARRIER_TIMEOUT_S = 60.0


def shutdown_distributed(*, clean: bool = True, barrier_timeout_s: float = SHUTDOWN_BARRIER_TIMEOUT_S) -> None:
    """Leave the process group (if any) and forget the cached layout. The one shutdown path of
    training, tests and launchers.

    ``clean=True`` (every rank got here normally): wait for all ranks first, then destroy. Without
    the barrier a fast rank tears down its gloo connections while a peer is still using them,
    and the peer dies with SIGABRT ("terminate called without an active exception").
    ``clean=False`` (this rank is failing): no barrier, since the peers may never arrive; the group
    is destroyed and the launcher stops the other ranks.
    """
    if dist.is_available() and dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            try:
                if dist.get_backend() == "gloo":
                    # monitored_barrier names the rank that did not arrive instead of hanging silently.
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=barrier_timeout_s))
                else:
                    barrier()
            except Exception as error:  # a peer died: still leave the group, report why
                logger.warning("shutdown barrier failed (%s); destroying the process group anyway", error)
        dist.destroy_process_group()
    saved = _STATE.get("saved_environ")
    if isinstance(saved, dict):
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _STATE.clear()


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    if _group_active():
        return dist.get_rank()
    env = _STATE.get("env")
    return env.rank if isinstance(env, DistributedEnv) else 0


def get_world_size() -> int:
    if _group_active():
        return dist.get_world_size()
    env = _STATE.get("env")
    return env.world_size if isinstance(env, DistributedEnv) else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if not _group_active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


# --------------------------------------------------------------------------- logging
_RANK_HANDLER_ATTR = "_dinov2_rank_handler"


def setup_rank_logging(output_dir: str | os.PathLike, rank: int, *, name: str = "dinov2_repro",
                       level: int = logging.INFO) -> logging.Logger:
    """Log to ``<output_dir>/logs/rank<k>.log`` on every rank, and to the console on rank 0 only.

    Calling it again (e.g. after a requeue in the same process) replaces the handlers
    it added instead of stacking duplicates.
    """
    log_dir = Path(output_dir) / "logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create log directory {log_dir}: {error}") from error
    log = logging.getLogger(name)
    for handler in [h for h in log.handlers if getattr(h, _RANK_HANDLER_ATTR, False)]:
        log.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.FileHandler(log_dir / f"rank{rank}.log", encoding="utf-8")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _RANK_HANDLER_ATTR, True)
        log.addHandler(handler)
    log.setLevel(level)
    # Without this, records would also reach the root logger's console handler on every rank.
    log.propagate = False
    return log
