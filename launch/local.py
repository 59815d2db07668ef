"""Run one command as N ranks on this machine, the way torchrun would.

Each rank gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; the command itself joins the process group (``init_distributed``).
Output is forwarded line by line with a ``[rank k]`` prefix. The first rank that fails
stops the run: the others are terminated (their whole process groups, so dataloader
workers go too) and its exit code is returned.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Mapping, Sequence

from dinov2_repro.distributed.env import LOCAL_LAUNCHER_VAR, find_free_port  # noqa: F401  (re-exported)


def exit_code_of(returncode: int) -> int:
    """Shell convention: a process killed by signal N exits with 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def rank_environment(*, rank: int, nproc: int, master_addr: str, master_port: int,
                     base: Mapping[str, str], extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(base)
    env.update(extra or {})
    env.update({
        "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
        # Tells detect_env these torchrun-style variables beat a surrounding Slurm task's.
        LOCAL_LAUNCHER_VAR: "local",
        "PYTHONUNBUFFERED": "1",
    })
    # Like torchrun: N ranks each using every core would oversubscribe the machine.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def _forward(pipe: IO[bytes], rank: int, stream: IO[str], lock: threading.Lock, prefix: bool) -> None:
    tag = f"[rank {rank}] " if prefix else ""
    for raw in iter(pipe.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        with lock:
            stream.write(tag + line if line.endswith("\n") else tag + line + "\n")
            stream.flush()
    pipe.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # each rank leads its own session (start_new_session=True)
    except ProcessLookupError:
        pass


def _stop_all(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every still-running rank, SIGKILL whatever is left after ``grace_s``."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def run_local(cmd: Sequence[str], *, nproc: int, env: Mapping[str, str] | None = None,
              master_port: int | None = None, master_addr: str = "127.0.0.1",
              stream: IO[str] | None = None, prefix_output: bool = True,
              terminate_grace_s: float = 10.0, poll_interval_s: float = 0.05) -> int:
    """Run ``cmd`` (a full command line) as ``nproc`` ranks; return 0 or the first failure's exit code.

    ``env`` adds/overrides variables for every rank. A rank killed by a signal is
    reported on stderr with its rank and signal name, and counts as exit code 128+N.
    """
    cmd = [str(part) for part in cmd]
    if not cmd:
        raise ValueError("run_local: empty command")
    if nproc < 1:
        raise ValueError(f"run_local: nproc={nproc} must be >= 1")
    port = master_port if master_port is not None else find_free_port(master_addr)
    out = stream if stream is not None else sys.stdout
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    readers: list[threading.Thread] = []
    try:
        for rank in range(nproc):
            rank_env = rank_environment(rank=rank, nproc=nproc, master_addr=master_addr, master_port=port,
                                        base=os.environ, extra=env)
            try:
                proc = subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as error:
                raise RuntimeError(f"run_local: cannot start rank {rank} with command {cmd}: {error}") from error
            procs.append(proc)
            reader = threading.Thread(target=_forward, args=(proc.stdout, rank, out, lock, prefix_output), daemon=True)
            reader.start()
            readers.append(reader)

        failure: tuple[int, int] | None = None  # (rank, returncode)
        while failure is None and any(p.returncode is None for p in procs):
            for rank, proc in enumerate(procs):
                if proc.returncode is None and proc.poll() is not None and proc.returncode != 0:
                    failure = (rank, proc.returncode)
                    break
            else:
                time.sleep(poll_interval_s)
        if failure is not None:
            rank, returncode = failure
            survivors = [r for r, p in enumerate(procs) if p.poll() is None]
            with lock:
                print(f"run_local: rank {rank} (pid {procs[rank].pid}) {describe_exit(returncode)}; "
                      f"terminating ranks {survivors}", file=sys.stderr, flush=True)
            _stop_all(procs, terminate_grace_s)
            return exit_code_of(returncode)
        return 0
    finally:
        # Also reached on KeyboardInterrupt or an error while starting: never leave ranks behind.
        _stop_all(procs, terminate_grace_s)
        for reader in readers:
            reader.join(timeout=5.0)
