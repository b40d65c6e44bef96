"""``report.html`` of a training run, and a page comparing several runs, built only from the files a run writes:
``metrics.jsonl``, ``config.yaml``, ``train_results.json``, ``train.log``, ``data_summary.json``,
``skipped_samples.jsonl`` and ``eval_predictions/step-N.jsonl``. A run still going, or killed, gets a page of what
it has so far."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import yaml

from internvl_tune.report.html import cell, page, png_data_uri, table
from internvl_tune.report.predictions import predictions_section, read_rows
from internvl_tune.report.svg import PALETTE, Series, line_chart
from internvl_tune.train.metrics import read_jsonl, smooth

REPORT = "report.html"
PREDICTIONS_DIR = "eval_predictions"  # the trainer writes --eval_generate's answers there: step-N.jsonl
DATA_SUMMARY = "data_summary.json"  # the recipe's data_summary(), written by the trainer
ESTIMATE = re.compile(r"estimated peak GPU memory per rank: ([\d.]+) GiB")
# (title, y label, metrics keys) of each chart; a chart shows only the keys the run logged
CHARTS = [
    ("loss", "loss", ("loss", "eval_loss")),
    ("learning rate", "lr", ("lr",)),
    ("gradient norm", "norm", ("grad_norm",)),
    ("throughput", "per second", ("tokens_per_s", "samples_per_s")),
    ("MFU (GPU runs)", "MFU", ("mfu",)),
    ("peak GPU memory", "GiB", ("memory_gib",)),
    ("time waiting for data", "share of the step", ("data_wait",)),
]
SMOOTHED = {"loss", "grad_norm", "tokens_per_s", "samples_per_s"}


@dataclass
class Run:
    """What a run directory holds (each part may be missing)."""

    path: Path
    config: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    results: dict | None = None
    log: list[str] = field(default_factory=list)
    data: dict | None = None
    skipped: list[dict] = field(default_factory=list)
    predictions: dict[int, Path] = field(default_factory=dict)  # eval step -> its predictions file

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def plan(self) -> list[str]:
        """The plan lines the run printed before its first step (the last plan, after a resume)."""
        blocks, current = [], []
        for line in self.log:
            if line.startswith("step ") or line.startswith("done:"):
                if current:
                    blocks.append(current)
                current = []
            elif not line.startswith(("stopped", "final model")):
                current.append(line)
        if current:
            blocks.append(current)
        return blocks[-1] if blocks else []

    @property
    def command(self) -> str | None:
        return next((line.removeprefix("command: ") for line in self.plan if line.startswith("command: ")), None)

    def series(self, key: str) -> list[tuple[float, float]]:
        return [(r["step"], float(r[key])) for r in self.rows if isinstance(r.get(key), (int, float))
                and not isinstance(r.get(key), bool)]

    def epochs(self) -> list[tuple[float, float]]:
        return self.series("epoch")

    def last(self, key: str):
        values = self.series(key)
        return values[-1][1] if values else None


def read_run(path: str | Path) -> Run:
    """Read whatever of a run's files exist."""
    from internvl_tune.errors import UserError

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory — pass a training run's --output_dir")
    run = Run(path)
    if (path / "config.yaml").is_file():
        run.config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if (path / "metrics.jsonl").is_file():
        run.rows = read_jsonl(path / "metrics.jsonl")
    if (path / "train_results.json").is_file():
        run.results = json.loads((path / "train_results.json").read_text())
    if (path / "train.log").is_file():
        run.log = (path / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()
    if (path / DATA_SUMMARY).is_file():
        run.data = json.loads((path / DATA_SUMMARY).read_text())
    if (path / "skipped_samples.jsonl").is_file():
        run.skipped = read_jsonl(path / "skipped_samples.jsonl")
    for f in (path / PREDICTIONS_DIR).glob("step-*.jsonl"):
        if f.stem[5:].isdigit():
            run.predictions[int(f.stem[5:])] = f
    if not (run.rows or run.config or run.log):
        raise UserError(f"{path}: no metrics.jsonl, config.yaml or train.log — not a training run's output directory")
    return run


# ----------------------------------------------------------------------------------------------- one run
def _summary(run: Run) -> str:
    r = run.results or {}
    unit = "tokens" if run.series("tokens_per_s") else "samples"
    estimate = next((float(m.group(1)) for line in run.plan if (m := ESTIMATE.search(line))), None)
    status = ("interrupted (resume with --resume_from_checkpoint auto)" if r.get("interrupted") else "finished") \
        if run.results else "running or killed (no train_results.json yet)"
    rows = [
        ["status", status],
        ["optimizer steps", r.get("global_step", run.rows[-1]["step"] if run.rows else None)],
        ["epochs", r.get("epoch", run.last("epoch"))],
        ["last / mean train loss", _pair(r.get("train_loss", run.last("loss")), r.get("train_loss_mean"))],
        ["last eval loss", r.get("eval_loss", run.last("eval_loss"))],
        [f"{unit}/s (whole run)", r.get(f"{unit}_per_s")],
        ["runtime", f"{r['train_runtime_s'] / 60:.1f} min" if r.get("train_runtime_s") is not None else None],
        ["peak GPU memory: estimated / measured (GiB)", _pair(estimate, r.get("peak_memory_gib", run.last("memory_gib")))
         if (r.get("peak_memory_gib") or run.last("memory_gib")) else f"{estimate or '-'} / not measured (no GPU)"],
        ["skipped steps (non-finite)", r.get("skipped_steps", run.last("skipped_steps"))],
    ]
    return table(["", ""], rows).replace("<thead><tr><th></th><th></th></tr></thead>", "")


def _pair(a, b) -> str | None:
    if a is None and b is None:
        return None
    show = [f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v) for v in (a, b)]
    return " / ".join(show)


def _charts(run: Run) -> str:
    svgs = []
    for title, y_label, keys in CHARTS:
        series = []
        for n, key in enumerate(k for k in keys if any(y for _, y in run.series(k))):  # not all-zero (CPU memory)
            series += _lines(key, run.series(key), PALETTE[n])
        if series:
            svgs.append(line_chart(series, f"{run.name}: {title}", y_label, epochs=run.epochs()))
    generated = sorted({k for r in run.rows for k in r if k.startswith("eval_gen_")})
    if generated:
        series = [Series(k.removeprefix("eval_gen_"), run.series(k), PALETTE[n % len(PALETTE)], markers=True)
                  for n, k in enumerate(generated)]
        svgs.append(line_chart(series, f"{run.name}: generated answers (--eval_generate)", "score",
                               epochs=run.epochs()))
    return '<h2>Curves</h2><div class="charts">' + "".join(svgs) + "</div>" if svgs else ""


def _lines(key: str, points: list[tuple[float, float]], color: str, label: str | None = None) -> list[Series]:
    """A raw line, with a smoothed one over it for noisy per-step series (TensorBoard's debiased EMA)."""
    label = label or key
    if key in SMOOTHED and len(points) >= 10:
        xs, ys = zip(*points)
        return [Series(f"{label} (raw)", points, color, faint=True),
                Series(f"{label} (smoothed)", list(zip(xs, smooth(list(ys)))), color)]
    return [Series(label, points, color, markers=key.startswith("eval_") or len(points) < 30)]


def _evaluation(run: Run) -> str:
    keys = ["eval_loss"] + sorted({k for r in run.rows for k in r if k.startswith("eval_gen_")})
    steps = sorted({r["step"] for r in run.rows if any(k in r for k in keys)})
    parts = []
    if steps:
        by_step = {s: {} for s in steps}
        for r in run.rows:
            if r["step"] in by_step:
                by_step[r["step"]].update({k: r[k] for k in keys if k in r})
        parts.append("<h2>Evaluation</h2>" + table(["step", *(k.replace("_", " ") for k in keys)],
                                                     [[s, *(by_step[s].get(k) for k in keys)] for s in steps]))
    if run.predictions:
        step = max(run.predictions)
        parts.append(predictions_section(read_rows(run.predictions[step]),
                                         f"Generated answers at step {step} (--eval_generate)"))
    return "\n".join(parts)


def _data(run: Run) -> str:
    parts = []
    d = run.data
    if d:
        parts.append("<h2>Data</h2>")
        kinds = d.get("kinds", [])
        rows = [[name, v.get("samples"), *(v.get(k, 0) for k in kinds)] for name, v in d.get("datasets", {}).items()]
        rows.append(["total", d.get("samples"), *(sum(v.get(k, 0) for v in d.get("datasets", {}).values()) for k in kinds)])
        parts.append("<h3>samples per epoch</h3>" + table(["dataset", "samples", *kinds], rows))
        if d.get("tiles"):
            parts.append("<h3>tiles per sample (estimated)</h3>"
                         + table(["tiles", "samples"], [[int(t), n] for t, n in d["tiles"].items()]))
        hist = d.get("token_histogram") or []
        if hist:
            peak = max(c for _, c in hist) or 1
            bars = [[cell(label), cell(count), f'<td><span class="bar" style="width:{round(240 * count / peak)}px">'
                     f"</span></td>"] for label, count in hist]
            parts.append("<h3>tokens per sample (estimated)</h3>" + table(["tokens", "samples", ""], bars, raw=True))
    if run.skipped:
        keys = list(dict.fromkeys(k for r in run.skipped for k in r))
        parts.append(f"<h3>skipped samples ({len(run.skipped)})</h3>"
                     + table(keys, [[r.get(k) for k in keys] for r in run.skipped[:100]]))
    return "\n".join(parts)


def run_page(run: Run) -> str:
    """The report of one run."""
    config = yaml.safe_dump(run.config, sort_keys=False) if run.config else ""
    plots = "".join(f'<img src="{uri}" alt="{name}" title="{name}">' for name in ("loss.png", "lr.png",
                    "grad_norm.png", "throughput.png") if (uri := png_data_uri(run.path / name)))
    sections = [
        f"<h1>{escape(run.name)}</h1><p class=\"muted\">{escape(str(run.path.resolve()))}</p>",
        f"<pre>{escape(run.command)}</pre>" if run.command else "",
        _summary(run),
        "<h2>Plan</h2><pre>" + escape("\n".join(line for line in run.plan if not line.startswith("command: ")))
        + "</pre>" if run.plan else "",
        _charts(run),
        _evaluation(run),
        _data(run),
        f"<h2>Configuration</h2><details><summary>config.yaml</summary><pre>{escape(config)}</pre></details>"
        if config else "",
        f"<h2>Log</h2><details><summary>the last lines of train.log</summary><pre>"
        f"{escape(chr(10).join(run.log[-40:]))}</pre></details>" if run.log else "",
        f"<details><summary>the PNG plots</summary><div class=\"thumbs\">{plots}</div></details>" if plots else "",
    ]
    return page(f"{run.name}: internvl-tune run report", [s for s in sections if s])


def write_run_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` of the run (into the run directory unless ``out`` is given); returns its path."""
    run = read_run(run_dir)
    out = Path(out) if out is not None else run.path / REPORT
    _write(out, run_page(run))
    return out


# ----------------------------------------------------------------------------------------------- several runs
def compare_page(runs: list[Run]) -> str:
    """Several runs side by side: a table of their numbers and their curves overlaid."""
    generated = sorted({k for run in runs for r in run.rows for k in r if k.startswith("eval_gen_")})
    headers = ["run", "steps", "epochs", "last loss", "last eval loss", "tokens/s", "peak GiB",
               *(k.removeprefix("eval_") for k in generated)]
    rows = []
    for run in runs:
        r = run.results or {}
        rows.append([run.name, r.get("global_step", run.rows[-1]["step"] if run.rows else None), run.last("epoch"),
                     run.last("loss"), run.last("eval_loss"), r.get("tokens_per_s", r.get("samples_per_s")),
                     r.get("peak_memory_gib"), *(run.last(k) for k in generated)])
    svgs = []
    for title, y_label, keys in CHARTS + [(k.removeprefix("eval_"), "score", (k,)) for k in generated]:
        for key in keys:
            series = []
            for n, run in enumerate(runs):
                points = run.series(key)
                if points:
                    lines = _lines(key, points, PALETTE[n % len(PALETTE)], run.name)
                    series += [s for s in lines if not s.faint] if len(lines) > 1 else lines
            if series:
                svgs.append(line_chart(series, f"{title}: {key}" if key != title else title, y_label))
    commands = "".join(f"<h3>{escape(run.name)}</h3><pre>{escape(run.command or str(run.path))}</pre>" for run in runs)
    names = ", ".join(run.name for run in runs)
    return page(f"compare: {names}", [
        f"<h1>{len(runs)} runs compared</h1><p class=\"muted\">{escape(names)}</p>",
        "<h2>Numbers</h2>" + table(headers, rows),
        '<h2>Curves</h2><div class="charts">' + "".join(svgs) + "</div>",
        "<h2>Commands</h2>" + commands,
    ])


def write_compare_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write the comparison page of ``run_dirs`` to ``out``; returns its path."""
    out = Path(out)
    _write(out, compare_page([read_run(p) for p in run_dirs]))
    return out


def _write(path: Path, html: str) -> None:
    """Atomically: a browser (or the test) never sees half a page."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
