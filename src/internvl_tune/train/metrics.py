"""Run metrics: JSONL (the source of truth), CSV, TensorBoard, and PNG plots of loss / lr / grad-norm."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path


class MetricsLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl``; mirrors it to TensorBoard and CSV.

    Only the main rank should hold an enabled logger. Appending is resume-safe: on resume, rows at or after the
    resumed step are dropped first, so a crash never leaves duplicated steps in the log.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            rows = [r for r in read_jsonl(self.path) if r.get("step", 0) < resume_step]
            _atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a core dependency; stay usable without it
                self.writer = None

    def log(self, step: int, values: dict) -> None:
        """Record ``values`` (floats, ints, short strings) at optimizer step ``step``."""
        if not self.enabled:
            return
        row = {"step": step, **values}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        """Write ``metrics.csv`` and the PNG plots from the JSONL log."""
        if not self.enabled or not self.path.exists():
            return
        rows = read_jsonl(self.path)
        if self.writer is not None:
            self.writer.flush()
        write_csv(rows, self.run_dir / "metrics.csv")
        write_plots(rows, self.run_dir)

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a metrics log; a torn last line (crash mid-write) is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(rows: list[dict], path: Path) -> None:
    """All rows as CSV, with the union of keys as columns (empty where a row lacks one)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


PLOTS = {"loss.png": ("loss", "eval_loss"), "lr.png": ("lr",), "grad_norm.png": ("grad_norm",)}


def write_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """``loss.png`` (train + eval loss), ``lr.png`` and ``grad_norm.png`` against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for filename, keys in PLOTS.items():
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for key, points in series.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(keys[0])
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = out_dir / (filename + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, out_dir / filename)
        written.append(out_dir / filename)
    return written
