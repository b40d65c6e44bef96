"""The run report in a real browser (headless Chromium, offline): it draws, every image and chart loads, nothing
is fetched, no console error, and the tables hold the run's own numbers (read from its metrics.jsonl)."""

from __future__ import annotations

import json

import pytest
from browser import pixel_spread, render

from internvl_tune.train.metrics import read_jsonl

pytestmark = pytest.mark.slow


def _assert_drawn(page):
    assert page.errors == [], page.errors
    assert page.blocked == [], f"the page asked the network for {page.blocked}"
    assert all(url.startswith(("file://", "data:")) for url in page.requests), page.requests
    assert pixel_spread(page.screenshot) > 20  # not a blank page
    assert page.images and all(i["complete"] and i["width"] > 0 for i in page.images), page.images
    assert page.charts and all(c["width"] > 100 and c["height"] > 100 for c in page.charts), page.charts


def test_run_report_in_chromium(tiny_run, tmp_path):
    page = render(tiny_run / "report.html", tmp_path / "report.png", tmp_path)
    _assert_drawn(page)
    assert all(c["lines"] > 0 for c in page.charts)  # every chart drew its lines
    rows = read_jsonl(tiny_run / "metrics.jsonl")
    results = json.loads((tiny_run / "train_results.json").read_text())
    text = page.text
    for value in ([r["eval_loss"] for r in rows if "eval_loss" in r]
                  + [r["eval_gen_anls"] for r in rows if "eval_gen_anls" in r]
                  + [results["train_loss"], results["train_loss_mean"]]):
        assert f"{value:.4g}" in text, value
    assert str(results["global_step"]) in text
    answers = [json.loads(line) for line in (tiny_run / "eval_predictions/step-4.jsonl").read_text().splitlines()]
    for answer in answers:  # each generated answer is shown, beside its reference
        assert answer["reference"] in text
    # the thumbnails: one per image of the shown samples, a video as one frame
    assert len(page.images) >= sum(len(a["images"]) for a in answers)


def test_compare_page_in_chromium(tiny_run, tmp_path):
    from internvl_tune.report import write_compare_report

    other = tmp_path / "second-run"
    other.mkdir()
    (other / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "epoch": s / 4, "loss": 4.0 - s / 2,
                                                             "lr": 1e-3, "tokens_per_s": 100.0 * s}) + "\n"
                                                 for s in range(1, 5)))
    out = write_compare_report([tiny_run, other], tmp_path / "compare.html")
    page = render(out, tmp_path / "compare.png", tmp_path)
    assert page.errors == [] and page.blocked == [] and pixel_spread(page.screenshot) > 20
    assert page.charts and all(c["lines"] > 0 for c in page.charts)
    assert "tiny-run" in page.text and "second-run" in page.text and "2" in page.text
