"""Generated answers beside their images: the rows of ``predictions.jsonl`` (``eval chat``) or of
``eval_predictions/step-N.jsonl`` (training with ``--eval_generate``), best and worst first."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from internvl_tune.report.html import cell, table, thumbnails

# what orders the answers: the first score a row has (ROUGE-L needs Java; ANLS is always there)
SORT_KEYS = ("rouge_l", "anls", "exact_match")
SHOWN = 8  # best and worst each, when there are more than 2 x SHOWN answers
METRIC_COLUMNS = ("exact_match", "relaxed_accuracy", "anls", "choice_accuracy", "bleu4", "rouge_l", "cider")


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a predictions JSONL (a torn last line is ignored)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def sort_key(row: dict) -> float:
    scores = row.get("scores") or {}
    return next((scores[k] for k in SORT_KEYS if scores.get(k) is not None), 0.0)


def _answer_cell(row: dict) -> str:
    refs = row.get("references") or [row.get("reference", "")]
    text = "<br>".join(escape(r) for r in refs)
    return f"<td>{text}</td>"


def _prediction(text: str) -> str:
    """An answer; an empty one says so (the model ended its turn at once)."""
    return escape(text) if text.strip() else '<span class="muted">(empty: the model ended its turn at once)</span>'


def _scores_cell(scores: dict | None) -> str:
    if not scores:
        return '<td class="muted">-</td>'
    parts = [f"{k} {v:.3g}" for k, v in scores.items() if v is not None]
    return "<td><code>" + "<br>".join(escape(p) for p in parts) + "</code></td>"


def predictions_section(rows: list[dict], title: str) -> str:
    """A table of answers with thumbnails: the best and the worst (all of them when few), and the means per dataset."""
    if not rows:
        return f"<h2>{escape(title)}</h2><p class=\"muted\">no predictions</p>"
    ordered = sorted(rows, key=sort_key, reverse=True)
    compare = any("base_prediction" in r for r in rows)
    if len(ordered) > 2 * SHOWN:
        groups = [("best", ordered[:SHOWN]), ("worst", ordered[-SHOWN:][::-1])]
    else:
        groups = [("all, best first", ordered)]
    headers = ["sample", "images", "prompt", "reference", "prediction", "scores"]
    if compare:
        headers += ["base prediction", "base scores"]
    parts = [f"<h2>{escape(title)}</h2>",
             f"<p class=\"muted\">{len(rows)} answers, ordered by "
             f"{next((k for k in SORT_KEYS if any((r.get('scores') or {}).get(k) is not None for r in rows)), 'score')}"
             "</p>"]
    for name, group in groups:
        body = []
        for row in group:
            good = "good" if sort_key(row) >= 0.5 else "bad"
            cells = [cell(f"{row.get('id', '')} ({row.get('kind', '')})"),
                     f"<td>{thumbnails(row.get('images') or [])}</td>", cell(row.get("prompt", "")),
                     _answer_cell(row), f'<td class="{good}">{_prediction(row.get("prediction", ""))}</td>',
                     _scores_cell(row.get("scores"))]
            if compare:
                cells += [f"<td>{_prediction(row.get('base_prediction', ''))}</td>", _scores_cell(row.get("base_scores"))]
            body.append(cells)
        parts.append(f"<h3>{escape(name)}</h3>" + table(headers, body, raw=True).replace("<table>", '<table class="pred">', 1))
    return "\n".join(parts)


def metrics_table(summaries: dict[str, dict[str, dict]]) -> str:
    """Means per dataset (rows) and model label (``model``, ``base``) from ``scores.json``'s ``metrics``."""
    first = next(iter(summaries.values()))
    rows = []
    for group in first:
        for label, summary in summaries.items():
            s = summary.get(group, {})
            rows.append([group, label, s.get("samples"), *(s.get(c) for c in METRIC_COLUMNS)])
    return table(["dataset", "model", "samples", *METRIC_COLUMNS], rows)
