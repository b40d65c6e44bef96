"""Progress display for long jobs: a rich bar with ETA on a terminal, plain lines otherwise, and a text log of the run.

Every line the run prints (the plan, logged steps, validation, warnings, the end) is also appended to
``<output_dir>/train.log``. When the console goes away (``| tee`` killed by the same Ctrl-C that stops the run), the
console output stops quietly instead of raising ``BrokenPipeError`` in the middle of writing the stop checkpoint.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

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

    Args:
        total: optimizer steps of the run.
        description: the bar's label.
        enabled: False on ranks other than the main one.
        start: the step the run starts from (resume).
        log_path: a text file that receives every printed line and every logged step.
    """

    def __init__(self, total: int, description: str, enabled: bool = True, start: int = 0,
                 log_path: Path | None = None):
        self.enabled = enabled
        self.total = total
        self.start_time = time.monotonic()
        self.start_step = start
        self.console = Console(stderr=True)
        self.log = open(log_path, "a", encoding="utf-8") if enabled and log_path is not None else None
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

    def _line(self, step: int, status: str) -> str:
        eta = self.eta_seconds(step)
        eta_text = f"{eta / 60:.1f} min" if eta == eta else "?"
        return f"step {step}/{self.total} | {status} | eta {eta_text}"

    def _console(self, write) -> None:
        """Write to the console unless it has gone away; then stop writing to it."""
        if not self.enabled:
            return
        try:
            write()
        except (BrokenPipeError, OSError):
            self.enabled, self.bar = False, None

    def _to_log(self, text: str) -> None:
        if self.log is not None:
            self.log.write(text + "\n")
            self.log.flush()

    def update(self, step: int, status: str = "", log: bool = False) -> None:
        """Move to ``step`` (completed optimizer steps) and show ``status``."""
        if log:
            self._to_log(self._line(step, status))
        if self.bar is not None:
            self._console(lambda: self.bar.update(self.task, completed=step, status=status))
        elif log:
            self._console(lambda: print(self._line(step, status), file=sys.stderr, flush=True))

    def print(self, text: str) -> None:
        """Print a line of the run (plan, validation, notices) on the console and into the text log."""
        self._to_log(text)
        self._console(lambda: self.console.print(text))

    def close(self) -> None:
        if self.bar is not None:
            self._console(self.bar.stop)
        if self.log is not None:
            self.log.close()
            self.log = None
