"""Progress of long curation loops: a tqdm bar (rate, ETA) on a terminal, a periodic log line
(done/total, rate, ETA) otherwise (Slurm logs, pipes). Sharded jobs name their shard in ``desc``."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("dinov2_repro.curation.progress")


class Progress:
    """``update(n)`` as items finish; ``close()`` (or ``with``) at the end."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", enabled: bool = True, interval_s: float = 10.0,
                 stream=None) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done, self.start, self.last = 0, time.monotonic(), time.monotonic()
        self.interval_s = interval_s
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval_s or self.done >= self.total:
            self.last = now
            log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:.2f} {self.unit}/s, elapsed {elapsed:.0f}s, ETA {eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
