"""Process lifetime helpers: a graceful stop on SIGTERM/SIGINT agreed by every rank, and the
parent-death signal that keeps children from outliving whoever started them.

Who handles what:
- ``--launcher local`` forwards SIGTERM/SIGINT to every rank (launch/local.py); each rank's
  ``StopRequest`` records it, the ranks agree on it at the next iteration boundary (an all-reduce,
  so a signal that reached one rank stops all of them at the same iteration), save a checkpoint
  and exit with 128 + signal.
- Under Slurm, submitit owns the signals (it ignores SIGTERM and checkpoints/requeues on USR2);
  ``StopRequest`` leaves a handler that is not the default alone, so that protocol is unchanged.
- A SIGKILLed parent cannot forward anything: children ask the kernel for SIGKILL when their
  parent dies (``set_parent_death_signal``), ranks of the local launcher and DataLoader workers alike.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from types import FrameType

import torch
import torch.distributed as dist

logger = logging.getLogger("dinov2_repro")

_PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def set_parent_death_signal(sig: int = signal.SIGKILL, *, expected_parent: int | None = None) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where unsupported.

    ``expected_parent``: the parent's pid as the parent saw itself; if the parent already died
    before the request was made (this process got re-parented), exit at once instead of running
    orphaned.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(128 + int(sig))
    return True


def _is_default_handler(sig: int) -> bool:
    current = signal.getsignal(sig)
    return current in (signal.SIG_DFL, None) or (sig == signal.SIGINT and current is signal.default_int_handler)


class StopRequest:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint and stop cleanly.

    Only default handlers are replaced (submitit's or a user's own stay); ``restore`` puts the
    previous ones back. Outside the main thread nothing is installed (Python allows handlers only there).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            if _is_default_handler(sig):
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            # A second signal means "now": the previous handlers come back and get this one.
            logger.warning("received %s again: stopping at once, without a checkpoint", signal.Signals(signum).name)
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        logger.warning("received %s: stopping after this iteration (checkpoint first; send it again to stop at once)",
                       signal.Signals(signum).name)

    def agreed(self) -> int | None:
        """The stop signal if any rank got one (collective when a process group exists), else None."""
        if not self._previous:
            return None  # nothing installed (e.g. under submitit): same answer on every rank, no collective
        local = self.signum or 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([local], dtype=torch.int64)
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        return local or None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class TrainingStopped(SystemExit):
    """Raised after the checkpoint once a stop signal was agreed; exits with 128 + signal number."""

    def __init__(self, signum: int, iteration: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.iteration = iteration

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name} at iteration {self.iteration} after saving a checkpoint"
