"""Report pages of the evaluation commands: ``eval chat`` (means per dataset, answers beside their images, a base
model beside the fine-tuned one), ``eval caption`` (scores, captions beside their images) and ``eval retrieval``
(recall@k, images with their captions)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from internvl_tune.report.html import page, table, thumbnails
from internvl_tune.report.predictions import metrics_table, predictions_section, read_rows
from internvl_tune.report.run import REPORT, _write

SHOWN_IMAGES = 24


def write_eval_chat_report(out_dir: str | Path, out: str | Path | None = None) -> Path:
    """``report.html`` of an ``eval chat`` output folder (``scores.json`` + ``predictions.jsonl``)."""
    from internvl_tune.errors import UserError

    folder = Path(out_dir)
    if not (folder / "scores.json").is_file():
        raise UserError(f"{folder}: no scores.json — pass the --output_dir of `internvl-tune eval chat`")
    scores = json.loads((folder / "scores.json").read_text())
    summaries = {"model": scores["metrics"], **({"base": scores["base_metrics"]} if "base_metrics" in scores else {})}
    rows = read_rows(folder / "predictions.jsonl") if (folder / "predictions.jsonl").is_file() else []
    models = [["model", scores.get("model")]] + ([["base", scores.get("base")]] if scores.get("base") else [])
    sections = [
        f"<h1>eval chat: {escape(Path(str(scores.get('model'))).name)}</h1>",
        table(["", "checkpoint"], models + [["generation", json.dumps(scores.get("generation"))],
                                            ["datasets", ", ".join(scores.get("datasets", []))]]),
        "<h2>Scores</h2>" + metrics_table(summaries),
        predictions_section(rows, "Answers"),
    ]
    out = Path(out) if out is not None else folder / REPORT
    _write(out, page(f"eval chat: {scores.get('model')}", sections))
    return out


def write_caption_report(out: str | Path, checkpoint: str, results: list, images: dict[str, dict[int, str]]) -> Path:
    """The caption evaluation's page: one scores table, then each dataset's first captions beside their images.

    Args:
        results: ``CaptionEvalResult`` of each dataset.
        images: ``{dataset: {image_id: image file}}``.
    """
    names = list(results[0].scores) if results else []
    score_rows = [[r.dataset, round(r.average_length, 4), *(r.scores[n] for n in names)] for r in results]
    sections = [f"<h1>eval caption: {escape(checkpoint)}</h1>",
                "<h2>Scores</h2>" + table(["dataset", "mean length", *names], score_rows)]
    for r in results:
        captions = json.loads(Path(r.captions_file).read_text())[:SHOWN_IMAGES]
        body = [[f"<td>{r.dataset}:{c['image_id']}</td>", f"<td>{thumbnails([images[r.dataset][c['image_id']]])}</td>",
                 f"<td>{escape(c['caption'])}</td>"] for c in captions]
        sections.append(f"<h2>{escape(r.dataset)}: the first {len(body)} captions</h2>"
                        + table(["image", "", "caption"], body, raw=True))
    out = Path(out)
    _write(out, page(f"eval caption: {checkpoint}", sections))
    return out


def write_retrieval_report(out: str | Path, record: dict, dataset) -> Path:
    """The retrieval evaluation's page: the recall@k table, then the first images with their captions.

    Args:
        record: clip_benchmark's result JSON (``dataset``, ``pretrained``, ``metrics``, ...).
        dataset: the ``RetrievalEvalSet`` evaluated.
    """
    metrics = record["metrics"]
    ks = sorted({int(k.rsplit("@", 1)[1]) for k in metrics})
    recall = [[direction, *(metrics.get(f"{key}_retrieval_recall@{k}") for k in ks)]
              for direction, key in (("text -> image", "image"), ("image -> text", "text"))]
    body = [[f"<td>{thumbnails([path])}</td>", "<td>" + "<br>".join(escape(c) for c in captions) + "</td>"]
            for path, captions in list(zip(dataset.image_paths, dataset.captions))[:SHOWN_IMAGES]]
    sections = [f"<h1>eval retrieval: {escape(record['dataset'])} ({escape(record.get('language', ''))})</h1>",
                table(["", ""], [["model", record.get("model")], ["checkpoint", record.get("pretrained")],
                                 ["images / captions", f"{len(dataset.image_paths)} / {dataset.num_texts}"]]),
                "<h2>Recall@k</h2>" + table(["retrieval", *(f"R@{k}" for k in ks)], recall),
                f"<h2>The first {len(body)} images and their captions</h2>" + table(["image", "captions"], body, raw=True)]
    out = Path(out)
    _write(out, page(f"eval retrieval: {record['dataset']}", sections))
    return out
