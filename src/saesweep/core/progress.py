"""Progress lines for job logs: done/total, rate and time left, at most every few seconds."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints ``{label}: {done}/{total} {unit} ({rate} {unit}/s, {eta} s left)`` to stderr,
    at most once per ``every`` seconds, and always on ``finish``."""

    def __init__(self, label: str, total: int, unit: str = "tokens", every: float = 10.0, done: int = 0) -> None:
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.start_done = self.done = done
        self.start = self.last = time.perf_counter()

    def rate(self) -> float:
        """Units per second since this object was made."""
        return (self.done - self.start_done) / max(time.perf_counter() - self.start, 1e-9)

    def update(self, done: int) -> None:
        """Record progress; print if ``every`` seconds passed since the last line."""
        self.done = done
        if time.perf_counter() - self.last >= self.every:
            self.print()

    def finish(self) -> None:
        """Print the final line."""
        self.print()

    def print(self) -> None:
        self.last = time.perf_counter()
        rate = self.rate()
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        print(
            f"{self.label}: {self.done}/{self.total} {self.unit} ({rate:,.0f} {self.unit}/s, {left:,.0f} s left)",
            file=sys.stderr,
            flush=True,
        )
