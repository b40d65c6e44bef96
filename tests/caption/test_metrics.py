"""Caption metrics equal pycocoevalcap's own COCOEvalCap (minus SPICE) on fixed prediction files."""

from __future__ import annotations

import json

import pytest
from caption_fixtures import SCENES

from internvl_tune.errors import DataError, UserError
from internvl_tune.eval.caption import metrics
from internvl_tune.eval.caption.datasets import load_references
from internvl_tune.eval.caption.metrics import METRIC_NAMES, mean_length, score_captions

# Predictions that exercise the tokenizer: casing, punctuation, commas, apostrophes, METEOR's "|||", unicode.
PREDICTIONS = [
    "a red bus on a city street",
    "A dog, running on GRASS!",
    "a surfer riding a big wave ||| in the ocean",
    "bananas on the table.",
    "the cat's sleeping on a couch",
    "a red bus parked next to a café",
    "dog",
    "someone surfing in the sea , near the beach",
]


def _write_fixed_files(tmp_path):
    """A COCO-format ground truth whose image order differs from id order, and a results file."""
    ids = [905, 12, 311, 7, 4242, 58, 1000, 77]
    gt = {"images": [{"id": i} for i in ids], "annotations": []}
    for k, image_id in enumerate(ids):
        for c in SCENES[k % len(SCENES)][1][: 2 + k % 2]:
            gt["annotations"].append({"image_id": image_id, "id": len(gt["annotations"]) + 1, "caption": c})
    gt["annotations"].reverse()  # annotation order must be kept per image, whatever the file order
    results = [{"image_id": i, "caption": p} for i, p in zip(ids, PREDICTIONS)]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    return tmp_path / "gt.json", tmp_path / "res.json"


class _NoSpice:
    """Stands in for SPICE inside COCOEvalCap (SPICE downloads CoreNLP models)."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


@pytest.mark.slow
def test_scores_equal_cocoevalcap_without_spice(tmp_path, monkeypatch, needs_java):
    pycocotools_coco = pytest.importorskip("pycocotools.coco")
    import pycocoevalcap.eval as cocoeval

    gt_file, res_file = _write_fixed_files(tmp_path)
    monkeypatch.setattr(cocoeval, "Spice", _NoSpice)
    coco = pycocotools_coco.COCO(str(gt_file))
    evaluator = cocoeval.COCOEvalCap(coco, coco.loadRes(str(res_file)))
    evaluator.evaluate()
    expected = {k: float(v) for k, v in evaluator.eval.items() if k != "SPICE"}

    predictions = {r["image_id"]: r["caption"] for r in json.loads(res_file.read_text())}
    ours = score_captions(load_references(gt_file), predictions)
    assert list(ours) == list(METRIC_NAMES)
    assert list(expected) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(expected[name], abs=1e-9), name
    assert all(type(v) is float for v in ours.values())  # prints as 0.123, not np.float64(0.123)
    assert 0.0 < ours["CIDEr"] and 0.0 < ours["Bleu_4"] < ours["Bleu_1"] < 1.0


def test_line_breaks_inside_captions_do_not_shift_later_captions(needs_java):
    # Java's tokenizer splits lines on \r and \u2028 too; unguarded, image 2 would get image 1's tail.
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {1: ["A cat\r on a mat."], 2: ["a dog\u2028in the park", "Dogs, playing!"], 3: ["two birds"]}
    assert metrics._tokenize(PTBTokenizer(), captions) == {
        1: ["a cat on a mat"], 2: ["a dog in the park", "dogs playing"], 3: ["two birds"]}


def test_missing_java_names_the_install_command(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get install default-jre-headless"):
        score_captions({1: ["a cat"]}, {1: "a cat"})


def test_ids_must_match_the_references():
    with pytest.raises(DataError, match=r"1 reference image\(s\) have no prediction \(e.g. \[2\]\)"):
        score_captions({1: ["a"], 2: ["b"]}, {1: "a"})
    with pytest.raises(DataError, match="absent from the references"):
        score_captions({1: ["a"]}, {1: "a", 3: "c"})
    with pytest.raises(DataError, match="no reference caption"):
        score_captions({1: []}, {1: "a"})


def test_mean_length_counts_whitespace_words():
    assert mean_length(["a dog  runs", "two cats\tsleep on a mat", ""]) == (3 + 6 + 0) / 3
    assert mean_length([]) == 0.0
