"""The pages of eval chat, eval caption and eval retrieval, from files written here, in headless Chromium: drawn,
offline, every thumbnail loaded, the numbers of the files on the page."""

from __future__ import annotations

import json

import pytest
from browser import pixel_spread, render
from sample_meta import SAMPLE

pytestmark = pytest.mark.slow


def _check(page):
    assert page.errors == [] and page.blocked == [], (page.errors, page.blocked)
    assert pixel_spread(page.screenshot) > 20
    assert page.images and all(i["complete"] and i["width"] > 0 for i in page.images), page.images


def test_eval_chat_page_with_a_base_beside(tmp_path):
    from internvl_tune.report import write_eval_chat_report

    rows = []
    for k, (image, answer, base) in enumerate([("coffee.jpg", "an espresso cup", "a cup"), ("chelsea.jpg", "a cat", "a dog")]):
        scores = {"exact_match": float(k == 0), "anls": 0.25 * (k + 1), "rouge_l": 0.5 - 0.1 * k}
        rows.append({"id": f"val:{k + 1}", "dataset": "val", "kind": "image", "prompt": "What is it?",
                     "images": [str(SAMPLE / "images" / image)], "reference": answer, "prediction": answer,
                     "scores": scores, "base_prediction": base, "base_scores": {"anls": 0.125}})
    rows.append({"id": "clip:1", "dataset": "val", "kind": "video", "prompt": "What happens?",
                 "images": [str(SAMPLE / "videos" / "coffee_zoom.mp4")], "reference": "a zoom", "prediction": "zoom",
                 "scores": {"anls": 0.0}, "base_prediction": "", "base_scores": {"anls": 0.0}})
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"val": {"samples": 3, "exact_match": 0.3333, "anls": 0.1875}, "overall": {"samples": 3, "anls": 0.1875}}
    (tmp_path / "scores.json").write_text(json.dumps({"model": "runs/x", "base": "pretrained/y", "generation": {},
                                                      "datasets": ["val"], "metrics": metrics,
                                                      "base_metrics": {"val": {"samples": 3, "anls": 0.0417},
                                                                       "overall": {"samples": 3, "anls": 0.0417}}}))
    page = render(write_eval_chat_report(tmp_path), tmp_path / "chat.png", tmp_path)
    _check(page)
    assert len(page.images) == 3  # two photos and the video's middle frame
    for text in ("0.1875", "0.0417", "0.3333", "an espresso cup", "a dog", "pretrained/y"):
        assert text in page.text, text
    assert page.text.index("an espresso cup") < page.text.index("What happens?")  # best first


def test_caption_and_retrieval_pages(tmp_path):
    from internvl_tune.data.retrieval import flickr_eval_set
    from internvl_tune.eval.caption.run import CaptionEvalResult
    from internvl_tune.report import write_caption_report, write_retrieval_report

    captions = tmp_path / "flickr30k_1.json"
    captions.write_text(json.dumps([{"image_id": 1, "caption": "a dog runs on the grass"}]))
    result = CaptionEvalResult("flickr30k", 5.0, {"Bleu_4": 0.2718, "CIDEr": 0.8125}, captions, captions, "")
    page = render(write_caption_report(tmp_path / "caption.html", "m", [result],
                                       {"flickr30k": {1: SAMPLE / "images" / "coffee.jpg"}}),
                  tmp_path / "caption.png", tmp_path)
    _check(page)
    assert "0.2718" in page.text and "0.8125" in page.text and "a dog runs on the grass" in page.text

    dataset = flickr_eval_set(SAMPLE / "flickr30k/flickr30k_test_karpathy.txt", SAMPLE / "flickr30k/Images")
    metrics = {"image_retrieval_recall@1": 0.4375, "text_retrieval_recall@1": 0.5,
               "image_retrieval_recall@5": 0.9375, "text_retrieval_recall@5": 1.0}
    record = {"dataset": "flickr30k", "model": "internvl_c_retrieval_hf", "pretrained": "p", "metrics": metrics,
              "language": "en"}
    page = render(write_retrieval_report(tmp_path / "retrieval.html", record, dataset), tmp_path / "r.png", tmp_path)
    _check(page)
    assert len(page.images) == min(len(dataset.image_paths), 24)
    assert "0.4375" in page.text and "0.9375" in page.text and "R@5" in page.text
    assert dataset.captions[0][0] in page.text
