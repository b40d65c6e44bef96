"""The evaluation driver: output files, the seed-format summary line, the chat results txt, early input checks."""

from __future__ import annotations

import json
import re

import pytest

from internvl_tune.errors import DataError
from internvl_tune.eval.caption.run import CaptionEvalConfig, chat_results_txt, evaluate_captions, summary_line

# ['coco', 'English caption:', 10.5974, dict_items([('Bleu_1', 0.78...), ..., ('CIDEr', 1.28...)])]
NUMBER = r"[0-9.e-]+"
METRICS = ", ".join(rf"\('{m}', {NUMBER}\)" for m in
                    ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"))
SEED_LINE = re.compile(rf"^\['(coco|flickr30k|nocaps)', 'English caption:', {NUMBER}, dict_items\(\[{METRICS}\]\)\]$")


def test_summary_line_prints_like_the_reference():
    scores = {"Bleu_1": 0.7876323287981284, "Bleu_2": 0.6353512494727918, "Bleu_3": 0.49108984183589743,
              "Bleu_4": 0.37062736733849205, "METEOR": 0.30106315496945923, "ROUGE_L": 0.5898249189475652,
              "CIDEr": 1.281844384075423}
    # The mean length is printed unrounded: 52987 words over 5000 captions is 10.5974 exactly.
    line = summary_line("internvl_g", "coco", "English caption:", "ckpt", 52987 / 5000, scores)
    assert line == ("['coco', 'English caption:', 10.5974, dict_items([('Bleu_1', 0.7876323287981284), "
                    "('Bleu_2', 0.6353512494727918), ('Bleu_3', 0.49108984183589743), ('Bleu_4', 0.37062736733849205), "
                    "('METEOR', 0.30106315496945923), ('ROUGE_L', 0.5898249189475652), ('CIDEr', 1.281844384075423)])]")
    assert SEED_LINE.match(line)
    chat = summary_line("internvl_chat", "nocaps", "p", "/abs/pretrained/InternVL2-1B", 10.0, scores)
    assert chat.startswith("['/abs/pretrained/InternVL2-1B', 'nocaps', 10.0, dict_items([('Bleu_1', ")
    assert chat_results_txt("results", "/abs/pretrained/InternVL2-1B/") == chat_results_txt("results", "x/pretrained/InternVL2-1B")
    assert chat_results_txt("results", "pretrained/InternVL2-1B").name == "pretrained_InternVL2-1B.txt"


@pytest.mark.slow
def test_two_datasets_write_captions_scores_and_seed_lines(data_root, tmp_path, captioner, needs_java):
    printed = []
    cfg = CaptionEvalConfig(datasets=["coco", "nocaps"], data_root=str(data_root),
                            out_dir=str(tmp_path / "results"), checkpoint="pretrained/tiny", batch_size=2,
                            generation={"num_beams": 5})
    results = evaluate_captions(captioner, cfg, print_fn=printed.append)
    assert [r.dataset for r in results] == ["coco", "nocaps"]
    lines = [p for p in printed if p.startswith("[")]
    assert len(lines) == 4  # one per dataset as it finishes, then both again at the end
    assert all(SEED_LINE.match(line) for line in lines), lines
    coco = results[0]
    assert re.fullmatch(r"coco_\d{12}\.json", coco.captions_file.name)
    captions = json.loads(coco.captions_file.read_text())
    assert [c["image_id"] for c in captions] == [391895 + 17 * k for k in range(5)]
    assert captions[0] == {"image_id": 391895, "caption": "a red picture of red things"}
    assert coco.average_length == 6.0
    record = json.loads(coco.scores_file.read_text())
    assert record["metrics"] == coco.scores and record["num_images"] == 5 and record["generation"] == {"num_beams": 5}
    assert 0.0 < coco.scores["Bleu_1"] < 1.0 and coco.scores["CIDEr"] > 0.0


def test_inputs_are_checked_before_generating(data_root, tmp_path, captioner, needs_java):
    cfg = CaptionEvalConfig(datasets=["nocaps"], data_root=str(data_root), out_dir=str(tmp_path / "o"))
    (data_root / "nocaps/images/0002ea2087020901.jpg").unlink()
    with pytest.raises(DataError, match=r"nocaps: 1 of 5 image file\(s\) not found, e\.g\. 0002ea2087020901.jpg; "
                                        r"looked in .*nocaps/images/.*data prepare"):
        evaluate_captions(captioner, cfg)
    gt = data_root / "coco/annotations/coco_karpathy_test_gt.json"
    data = json.loads(gt.read_text())
    data["images"] = data["images"][1:]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 391895]
    gt.write_text(json.dumps(data))
    cfg.datasets = ["coco"]
    with pytest.raises(DataError, match=r"coco_karpathy_test_gt.json: 1 image id\(s\) have no reference captions"):
        evaluate_captions(captioner, cfg)
    assert captioner.batch_sizes == []  # nothing was generated


def test_flickr_release_json_with_bare_file_names(bare_flickr_root, tmp_path, captioner, needs_java):
    cfg = CaptionEvalConfig(datasets=["flickr30k"], data_root=str(bare_flickr_root), out_dir=str(tmp_path / "o"))
    (result,) = evaluate_captions(captioner, cfg, print_fn=lambda line: None)
    assert [c["image_id"] for c in json.loads(result.captions_file.read_text())] == [
        1000100, 1000101, 1000102, 1000103, 1000110, 1000112]
    (bare_flickr_root / "flickr30k/Images/1000102.jpg").unlink()
    folder = bare_flickr_root / "flickr30k"
    with pytest.raises(DataError, match=re.escape(f"1 of 6 image file(s) not found, e.g. 1000102.jpg; "
                                                  f"looked in {folder}/ and {folder}/Images/")):
        evaluate_captions(captioner, cfg)
