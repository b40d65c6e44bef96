"""Progress display for long jobs: a rich bar with ETA on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class StepProgress:
    """Shows ``step/total``, elapsed, ETA and a free-text status (loss, tokens/s, memory) on the main rank.

    On a terminal it is a live rich bar; in a log file (not a TTY) it prints one line per ``update`` call with
    ``log=True`` so CI and Slurm logs stay readable.
    """

    def __init__(self, total: int, description: str, enabled: bool = True, start: int = 0):
        self.enabled = enabled
        self.total = total
        self.start_time = time.monotonic()
        self.start_step = start
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.bar = None
        if self.live:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
            )
            self.task = self.bar.add_task(description, total=total, completed=start, status="")
            self.bar.start()

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.monotonic() - self.start_time) / done * (self.total - step)

    def update(self, step: int, status: str = "", log: bool = False) -> None:
        """Move to ``step`` (completed optimizer steps) and show ``status``."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, status=status)
        elif log:
            eta = self.eta_seconds(step)
            eta_text = f"{eta / 60:.1f} min" if eta == eta else "?"
            print(f"step {step}/{self.total} | {status} | eta {eta_text}", file=sys.stderr, flush=True)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
