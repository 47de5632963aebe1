"""One progress line for long work: done / total, rate and time left, at most every few seconds."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_eta(seconds: float) -> str:
    """``75`` → ``1m 15s``; ``4000`` → ``1h 6m``; unknown → ``?``."""
    if seconds != seconds or seconds == float("inf") or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


class ProgressLine:
    """``update(done, total)`` prints ``[bifta] <what>: done/total <unit> (pct), rate/s, eta …`` when
    ``every_s`` seconds passed since the last line, and always when the work is complete."""

    def __init__(self, what: str, unit: str, *, every_s: float = 5.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.unit, self.every_s = what, unit, every_s
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self._last = -float("inf")

    def line(self, done: int, total: int) -> str:
        elapsed = max(1e-9, self.clock() - self.started)
        rate = done / elapsed
        left = (total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * done / total if total else 100.0
        return (f"[bifta] {self.what}: {done:,}/{total:,} {self.unit} ({pct:.0f}%), {rate:,.0f} {self.unit}/s, "
                f"eta {format_eta(left)}")

    def update(self, done: int, total: int) -> None:
        now = self.clock()
        if done < total and now - self._last < self.every_s:
            return
        self._last = now
        print(self.line(done, total), file=self.stream or sys.stderr, flush=True)
