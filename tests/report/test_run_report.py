"""report.html of a training run: written at the end of every run, rebuilt by `internvl-tune report`, and the
numbers it shows are the run's own (read here from metrics.jsonl, never typed in)."""

from __future__ import annotations

import json
import re

import pytest

from internvl_tune.cli import main
from internvl_tune.report.svg import format_number, nice_ticks
from internvl_tune.train.metrics import read_jsonl


def test_nice_ticks_and_labels():
    assert nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(11.21, 11.99) == pytest.approx([11.2, 11.4, 11.6, 11.8, 12.0])  # the top reaches the data
    assert nice_ticks(1, 4, 3) == [1, 2, 3, 4]
    assert [format_number(v) for v in (0, 5e-4, 12.5, 31500, 2.5e6)] == ["0", "5e-4", "12.5", "31.5k", "2.5M"]


@pytest.mark.slow
def test_run_writes_report_predictions_and_generation_scores(tiny_run):
    rows = read_jsonl(tiny_run / "metrics.jsonl")
    generated = [r for r in rows if "eval_gen_exact_match" in r]
    assert [r["step"] for r in generated] == [2, 4]
    for step in (2, 4):
        answers = [json.loads(line) for line in (tiny_run / f"eval_predictions/step-{step}.jsonl").read_text().splitlines()]
        # 4 samples spread over the 8 validation samples: every kind of the sample is asked
        assert len(answers) == 4 and {a["kind"] for a in answers} == {"text", "image", "multi_image", "video"}
        logged = next(r for r in generated if r["step"] == step)
        assert logged["eval_gen_anls"] == pytest.approx(sum(a["scores"]["anls"] for a in answers) / 4)
        assert logged["eval_gen_exact_match"] == pytest.approx(sum(a["scores"]["exact_match"] for a in answers) / 4)
    summary = json.loads((tiny_run / "data_summary.json").read_text())
    assert summary["samples"] == 8 and all(v["samples"] == 2 for v in summary["datasets"].values())
    html = (tiny_run / "report.html").read_text()
    assert "<h2>Plan</h2>" in html and "<h2>Curves</h2>" in html and "<h2>Data</h2>" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing to fetch: every image is inline


@pytest.mark.slow
def test_report_command_rebuilds_and_compares(tiny_run, tmp_path, capsys):
    (tiny_run / "report.html").unlink()
    assert main(["report", str(tiny_run)]) == 0
    html = (tiny_run / "report.html").read_text()
    last_eval = [r["eval_loss"] for r in read_jsonl(tiny_run / "metrics.jsonl") if "eval_loss" in r][-1]
    assert f"{last_eval:.4g}" in html
    out = tmp_path / "compare.html"
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 0.5, "loss": 3.25}) + "\n")
    assert main(["report", str(tiny_run), str(other), "--out", str(out)]) == 0
    page = out.read_text()
    assert "tiny-run" in page and "other-run" in page and ">3.25<" in page
    assert len(re.findall(r"<svg", page)) >= 3  # loss, lr, throughput ... overlaid


def test_report_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a training run's output directory" in capsys.readouterr().err


def test_png_plots_titles_epoch_axis_and_throughput(tmp_path, monkeypatch):
    import matplotlib.figure

    from internvl_tune.train.metrics import write_plots

    seen = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, path, *args, **kwargs):
        top = [a for a in fig.axes[0].child_axes if a.get_xlabel() == "epoch"]
        seen[str(path).split("/")[-1].removesuffix(".tmp.png")] = (
            fig.axes[0].get_title(), [round(t, 6) for t in top[0].get_xticks()] if top else None)
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    rows = [{"step": s, "epoch": s / 8, "loss": 2.0 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0 + s,
             "memory_gib": 3.5} for s in range(1, 17)]
    written = write_plots(rows, tmp_path, "my-run")
    assert [p.name for p in written] == ["loss.png", "lr.png", "grad_norm.png", "throughput.png"]
    assert seen["loss.png"][0] == "my-run: loss" and seen["throughput.png"][0] == "my-run: throughput and memory"
    assert {0.5, 1.0, 1.5, 2.0} <= set(seen["loss.png"][1])  # 8 steps per epoch: epochs along the top
    assert write_plots([{"step": 1, "loss": 1.0}], tmp_path / "..", "x")[0].name == "loss.png"


def test_eval_generate_needs_a_validation_set(tiny_model, tmp_path, capsys):
    from sample_meta import sample_meta

    meta = sample_meta(tmp_path, 1)
    assert main(["train", "--model_name_or_path", str(tiny_model), "--meta_path", str(meta), "--output_dir",
                 str(tmp_path / "run"), "--eval_generate", "2", "--report_to", "none", "--device", "cpu"]) == 2
    assert "add --eval_meta_path" in capsys.readouterr().err
