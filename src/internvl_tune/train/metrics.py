"""Run metrics: JSONL (the source of truth), CSV, PNG plots (loss, lr, grad norm, throughput and memory), and the sinks of
``--report_to`` (TensorBoard, Weights & Biases, MLflow).

Sink tags are grouped as the transformers Trainer groups them: ``train/loss``, ``train/lr``, ``eval/loss``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from internvl_tune.errors import UserError

SINKS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # sink -> the package it needs


def parse_report_to(value: str) -> list[str]:
    """The sinks of ``--report_to`` (comma-separated); an unknown or uninstalled sink is a UserError, not ignored.

    ``auto`` (the default) is TensorBoard when it is installed (otherwise none, with one notice); ``all`` is every
    installed sink, as the transformers Trainer reads it.
    """
    from internvl_tune.environment import available, install_hint, notice_missing

    names = [v.strip() for v in str(value).split(",") if v.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [name for name, package in SINKS.items() if available(package)]
    if names == ["auto"]:
        if available("tensorboard"):
            return ["tensorboard"]
        notice_missing("tensorboard", "TensorBoard logs")
        return []
    unknown = [n for n in names if n not in SINKS]
    if unknown or "none" in names:
        raise UserError(f"--report_to {value}: unknown sink {', '.join(unknown) or 'none (with others)'}; use a "
                        f"comma-separated list of {', '.join(SINKS)}, or all, auto or none")
    for name in names:
        if not available(SINKS[name]):
            raise UserError(f"--report_to {name}: the {SINKS[name]} package is not installed; `"
                            f"{install_hint(SINKS[name])}`, or drop it from --report_to")
    return names


def tag(key: str) -> str:
    """The sink tag of a metrics key: ``eval_loss`` -> ``eval/loss``, ``loss`` -> ``train/loss``."""
    return "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key


class MetricsLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl``; mirrors it to the sinks and CSV.

    Only the main rank should hold an enabled logger. Appending is resume-safe: on resume, rows at or after the
    resumed step are dropped first, so a crash never leaves duplicated steps in the log.

    Args:
        run_dir: the output directory.
        enabled: False on ranks other than the main one.
        sinks: names from :func:`parse_report_to`.
        resume_step: the first step this run logs when it resumes (None: a fresh run).
        config: the resolved run configuration, recorded by W&B and MLflow.
        run_name: the run's name in W&B, MLflow and the plot titles (``--run_name``; default: the folder's name).
            As with the transformers Trainer, ``WANDB_NAME`` overrides it in W&B, ``WANDB_PROJECT`` names the
            project and ``WANDB_DIR`` the folder W&B writes to (default: the run directory).
    """

    def __init__(self, run_dir: Path, enabled: bool = True, sinks: tuple[str, ...] = (), resume_step: int | None = None,
                 config: dict | None = None, run_name: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_name = run_name or self.run_dir.name
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.writer = self.wandb = self.mlflow = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            rows = [r for r in read_jsonl(self.path) if r.get("step", 0) < resume_step]
            _atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if "wandb" in sinks:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "internvl-tune"),
                                    dir=os.environ.get("WANDB_DIR") or str(self.run_dir),
                                    name=os.environ.get("WANDB_NAME") or self.run_name, config=config, resume="allow")
        if "mlflow" in sinks:
            import mlflow

            mlflow.start_run(run_name=self.run_name)
            mlflow.log_params(_flat(config or {}))
            self.mlflow = mlflow

    def log(self, step: int, values: dict) -> None:
        """Record ``values`` (floats, ints, short strings) at optimizer step ``step``."""
        if not self.enabled:
            return
        row = {"step": step, **values}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        scalars = {tag(k): v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=step)

    def flush(self) -> None:
        """Write ``metrics.csv`` and the PNG plots from the JSONL log."""
        if not self.enabled or not self.path.exists():
            return
        rows = read_jsonl(self.path)
        if self.writer is not None:
            self.writer.flush()
        write_csv(rows, self.run_dir / "metrics.csv")
        write_plots(rows, self.run_dir, self.run_name)

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _flat(config: dict, prefix: str = "") -> dict:
    """``{"train": {"seed": 1}}`` -> ``{"train.seed": 1}`` (MLflow parameters are flat)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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


# file -> (title, y label, keys on the left axis, keys on a right axis)
PLOTS = {
    "loss.png": ("loss", "loss", ("loss", "eval_loss"), ()),
    "lr.png": ("learning rate", "lr", ("lr",), ()),
    "grad_norm.png": ("gradient norm", "norm", ("grad_norm",), ()),
    "throughput.png": ("throughput and memory", "per second", ("tokens_per_s", "samples_per_s"), ("memory_gib",)),
    "reward.png": ("reward", "reward", ("reward",), ()),  # online RL (GRPO) runs
}
SMOOTHED = ("loss", "grad_norm", "tokens_per_s", "samples_per_s", "reward")  # noisy per-step series get a smoothed line


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (the first points are not pulled towards 0)."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def _points(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]


def _draw(ax, rows: list[dict], keys: tuple[str, ...], colors) -> list:
    """Plot ``keys`` on ``ax`` (raw + smoothed for noisy ones); returns the legend handles."""
    handles = []
    for key in keys:
        points = _points(rows, key)
        if not points or (key == "memory_gib" and not any(y for _, y in points)):  # no GPU: no memory to show
            continue
        xs, ys = zip(*points)
        color = next(colors)
        if key in SMOOTHED and len(xs) >= 10:
            handles.append(ax.plot(xs, ys, color=color, alpha=0.3, label=f"{key} (raw)")[0])
            handles.append(ax.plot(xs, smooth(list(ys)), color=color, label=f"{key} (smoothed)")[0])
        else:
            handles.append(ax.plot(xs, ys, color=color, marker="o" if len(xs) < 30 else None, markersize=3,
                                   label=key)[0])
    return handles


def write_plots(rows: list[dict], out_dir: Path, run_name: str | None = None) -> list[Path]:
    """``loss.png`` (train + eval loss), ``lr.png``, ``grad_norm.png``, ``throughput.png`` (tokens or samples per
    second, GPU memory on the right) and, for online RL, ``reward.png`` against the optimizer step; each titled with the run's name, with an epoch scale
    along the top when the rows carry epochs."""
    import itertools

    from internvl_tune.environment import available, notice_missing

    if not available("matplotlib"):  # the plots only decorate a run: metrics.jsonl / csv and report.html remain
        notice_missing("matplotlib", "the PNG plots (loss.png, ...)")
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, MaxNLocator

    name = run_name or Path(out_dir).name
    epochs = _points(rows, "epoch")
    written = []
    for filename, (title, y_label, left, right) in PLOTS.items():
        if not any(_points(rows, k) for k in left):
            continue
        colors = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
        fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
        handles = _draw(ax, rows, left, colors)
        if right and any(any(y for _, y in _points(rows, k)) for k in right):
            twin = ax.twinx()
            handles += _draw(twin, rows, right, colors)
            twin.set_ylabel("GiB")
        ax.set_title(f"{name}: {title}", fontsize=11)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(y_label)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.yaxis.set_major_formatter(EngFormatter(sep="") if filename == "throughput.png" else
                                     matplotlib.ticker.ScalarFormatter(useMathText=True))
        ax.tick_params(labelsize=9)
        if epochs and epochs[-1][1] > 0:
            per_epoch = epochs[-1][0] / epochs[-1][1]  # steps per epoch, from the last logged row
            top = ax.secondary_xaxis("top", functions=(lambda x: x / per_epoch, lambda e: e * per_epoch))
            top.set_xlabel("epoch", fontsize=9)
            top.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=8, loc="best")
        fig.tight_layout()
        tmp = out_dir / (filename + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, out_dir / filename)
        written.append(out_dir / filename)
    return written
