"""Run one command as N ranks on this machine, the way torchrun would.

Each rank gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; the command itself joins the process group (``init_distributed``).
Output is forwarded line by line with a ``[rank k]`` prefix. The first rank that fails
stops the run: the others are terminated (their whole process groups, so dataloader
workers go too) and its exit code is returned, with its last output line repeated last.

The launcher owns its ranks: SIGTERM/SIGINT sent to it are forwarded to every rank (which
checkpoint and exit, see dinov2_repro/distributed/signals.py), stragglers are SIGKILLed after
``signal_grace_s`` (time to write a checkpoint), and the launcher exits with 128 + signal. Each rank asks the kernel for
SIGKILL when the launcher dies, so even a SIGKILLed launcher leaves no rank running.
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
from dinov2_repro.distributed.signals import STOP_SIGNALS, set_parent_death_signal


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


def _forward(pipe: IO[bytes], rank: int, stream: IO[str], lock: threading.Lock, prefix: bool,
             last_lines: dict[int, str]) -> None:
    tag = f"[rank {rank}] " if prefix else ""
    for raw in iter(pipe.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if line.strip():
            last_lines[rank] = line.strip()
        with lock:
            stream.write(tag + line if line.endswith("\n") else tag + line + "\n")
            stream.flush()
    pipe.close()


def _die_with_launcher(launcher_pid: int) -> None:
    """Runs in each rank between fork and exec: SIGKILL this rank when the launcher dies."""
    set_parent_death_signal(signal.SIGKILL, expected_parent=launcher_pid)


class _ForwardedSignals:
    """Records SIGTERM/SIGINT sent to the launcher (the poll loop forwards them to the ranks)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_ForwardedSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, lambda signum, _frame: self.received.append(signum))
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # each rank leads its own session (start_new_session=True)
    except ProcessLookupError:
        pass


def _stop_all(procs: Sequence[subprocess.Popen], grace_s: float, *, sig: int = signal.SIGTERM,
              whole_group: bool = True) -> None:
    """Send ``sig`` to every still-running rank (its whole process group, or the rank process
    only), SIGKILL the groups of whatever is left after ``grace_s``."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        if whole_group:
            _signal_group(proc, sig)
        else:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
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
              terminate_grace_s: float = 10.0, signal_grace_s: float = 60.0, poll_interval_s: float = 0.05) -> int:
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
    last_lines: dict[int, str] = {}
    launcher_pid = os.getpid()
    signals = _ForwardedSignals().__enter__()
    try:
        for rank in range(nproc):
            rank_env = rank_environment(rank=rank, nproc=nproc, master_addr=master_addr, master_port=port,
                                        base=os.environ, extra=env)
            try:
                proc = subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=lambda: _die_with_launcher(launcher_pid))
            except OSError as error:
                raise RuntimeError(f"run_local: cannot start rank {rank} with command {cmd}: {error}") from error
            procs.append(proc)
            reader = threading.Thread(target=_forward, args=(proc.stdout, rank, out, lock, prefix_output, last_lines),
                                      daemon=True)
            reader.start()
            readers.append(reader)

        failure: tuple[int, int] | None = None  # (rank, returncode)
        while failure is None and any(p.returncode is None for p in procs):
            if signals.received:
                return _stop_on_signal(procs, signals.received[0], signal_grace_s, lock)
            for rank, proc in enumerate(procs):
                if proc.returncode is None and proc.poll() is not None and proc.returncode != 0:
                    failure = (rank, proc.returncode)
                    break
            else:
                time.sleep(poll_interval_s)
        if failure is not None:
            rank, returncode = failure
            survivors = [r for r, p in enumerate(procs) if p.poll() is None]
            _stop_all(procs, terminate_grace_s)
            readers[rank].join(timeout=5.0)  # its last words are the cause: print them last
            cause = f"; its last output: {last_lines[rank]}" if rank in last_lines else ""
            with lock:
                print(f"run_local: rank {rank} (pid {procs[rank].pid}) {describe_exit(returncode)}; "
                      f"terminated ranks {survivors}{cause}", file=sys.stderr, flush=True)
            return exit_code_of(returncode)
        return 0
    finally:
        # Also reached on an error while starting: never leave ranks behind.
        _stop_all(procs, terminate_grace_s)
        for reader in readers:
            reader.join(timeout=5.0)
        signals.__exit__()


def _stop_on_signal(procs: Sequence[subprocess.Popen], signum: int, grace_s: float, lock: threading.Lock) -> int:
    """Forward ``signum`` to every rank (the rank process only: its DataLoader workers must keep
    serving while it checkpoints), wait up to ``grace_s``, then SIGKILL the stragglers' groups."""
    name = signal.Signals(signum).name
    with lock:
        print(f"run_local: received {name}; forwarding it to {sum(p.poll() is None for p in procs)} rank(s)",
              file=sys.stderr, flush=True)
    _stop_all(procs, grace_s, sig=signum, whole_group=False)
    # Whatever survived in a rank's group (a worker that outlived its rank) goes too.
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)
    return 128 + signum
