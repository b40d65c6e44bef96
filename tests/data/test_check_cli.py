"""`internvl-tune data check`: the sample is clean; each kind of corruption is reported with its file and line."""

from __future__ import annotations

import json
from pathlib import Path

from internvl_tune.cli import main

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"


def test_sample_is_clean_without_tokenizer(capsys):
    assert main(["data", "check", str(SAMPLE / "meta.json")]) == 0
    out = capsys.readouterr().out
    assert "clean: 0 error(s)" in out and "need --model_name_or_path" in out and "sample_video" in out


def test_sample_is_clean_with_tokenizer(qwen2, tmp_path, capsys):
    qwen2.save_pretrained(tmp_path / "tok")
    code = main(["data", "check", str(SAMPLE / "meta.json"), "--tokenizer", str(tmp_path / "tok"), "--conv_style",
                 "Hermes-2", "--dynamic_image_size", "True", "--use_thumbnail", "True", "--max_dynamic_patch", "6",
                 "--show", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tokens per sample" in out and "estimated tokens per epoch" in out and "<IMG_CONTEXT>×" in out


def _rewrite(path: Path, line: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_corrupted_copy_reports_each_problem_with_file_and_line(sample_copy, capsys):
    image = sample_copy / "image.jsonl"
    multi = sample_copy / "multi_image.jsonl"
    text = sample_copy / "text.jsonl"
    _rewrite(image, 2, '{"image": "chelsea.jpg", "conversations": [')  # bad JSON
    row = json.loads(image.read_text().splitlines()[3])
    row["image"] = "no_such_photo.jpg"
    _rewrite(image, 4, json.dumps(row))  # missing image
    row = json.loads(multi.read_text().splitlines()[0])
    row["conversations"][0]["value"] = "<image>\nOnly one placeholder for two images."
    _rewrite(multi, 1, json.dumps(row))  # wrong <image> count
    row = json.loads(text.read_text().splitlines()[4])
    row["conversations"][0]["from"] = "user"
    _rewrite(text, 5, json.dumps(row))  # unknown role
    code = main(["data", "check", str(sample_copy / "meta.json")])
    out = " ".join(capsys.readouterr().out.split())  # rich may wrap long lines
    assert code == 1
    assert f"{image}:2: invalid JSON" in out
    assert f"{image}:4: image not found" in out and "no_such_photo.jpg" in out
    assert f"{multi}:1: `image` lists 2 image(s) but the human turns hold 1 <image>" in out
    assert f"{text}:5: conversations[0].from is 'user'" in out
    assert "4 error(s)" in out


def test_meta_problems_and_error_cap(sample_copy, capsys):
    meta = json.loads((sample_copy / "meta.json").read_text())
    meta["sample_text"]["annotation"] = "gone.jsonl"
    meta["sample_image"]["length"] = 99
    (sample_copy / "meta.json").write_text(json.dumps(meta, indent=2))
    code = main(["data", "check", str(sample_copy / "meta.json"), "--max_errors", "1"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 1 and "annotation file not found" in out and "... and 1 more" in out
    assert "1 error(s), 1 warning(s)" in out


def test_strict_fails_on_warnings(sample_copy, capsys):
    meta = json.loads((sample_copy / "meta.json").read_text())
    meta["sample_image"]["length"] = 99
    (sample_copy / "meta.json").write_text(json.dumps(meta))
    assert main(["data", "check", str(sample_copy / "meta.json")]) == 0
    assert main(["data", "check", str(sample_copy / "meta.json"), "--strict"]) == 1


def test_a_file_ending_in_a_blank_line_is_clean_and_counts_its_lines(tmp_path, capsys):
    """`echo >> train.jsonl` after the final newline (issue 20.1): no "invalid JSON" at a phantom line, no false
    `length` warning, and no phantom sample."""
    from internvl_tune.data import RELEASE_DEFAULTS, DataConfig, SupervisedDataset

    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}] * 2
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n \t\n")
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": ".", "annotation": str(tmp_path / "d.jsonl"),
                                                          "length": 2}}))
    assert main(["data", "check", str(tmp_path / "meta.json")]) == 0
    assert "clean: 0 error(s), 0 warning(s)" in capsys.readouterr().out
    ds = SupervisedDataset(tmp_path / "meta.json", None, DataConfig().resolve(RELEASE_DEFAULTS))
    assert len(ds) == 2


def test_a_root_found_in_two_places_is_named_once(tmp_path, monkeypatch, capsys):
    """Issue 20.8: the current directory wins, and data check says which folder it used."""
    data, work = tmp_path / "data", tmp_path / "work"
    for folder in (data / "images", work / "images"):
        folder.mkdir(parents=True)
    (data / "d.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                                                {"from": "gpt", "value": "Hello"}]}) + "\n")
    (data / "meta.json").write_text(json.dumps({"d": {"root": "images", "annotation": "d.jsonl"}}))
    monkeypatch.chdir(work)
    assert main(["data", "check", str(data / "meta.json")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("root 'images' exists both") == 1
    assert (f"note dataset 'd': root 'images' exists both in the current directory ({work / 'images'}) and beside the "
            f"meta file ({data / 'images'}); using {work / 'images'}") in out
