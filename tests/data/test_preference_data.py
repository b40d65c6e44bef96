"""Preference lines (question / chosen / rejected): pairs that share their tiles, fitting, length estimates, and
`internvl-tune data check --objective dpo|mpo` with file:line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from internvl_tune.cli import main
from internvl_tune.constants import IGNORE_INDEX
from internvl_tune.data import CheckpointDefaults, DataConfig
from internvl_tune.data.preference import PreferenceDataset

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"
TINY = CheckpointDefaults(template="Hermes-2", image_size=56, downsample_ratio=0.5, num_image_token=4,
                          dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=6)


def _dataset(qwen2, **kw) -> PreferenceDataset:
    return PreferenceDataset(SAMPLE / "preference_meta.json", qwen2, DataConfig(**kw).resolve(TINY), is_train=False)


def test_pairs_have_two_rows_with_one_set_of_tiles(qwen2):
    ds = _dataset(qwen2)
    ctx = qwen2.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ds.kinds == ["image", "image", "image", "multi_image", "text", "text"]
    for i in range(len(ds)):
        s = ds[i]
        chosen, rejected = s["chosen_input_ids"], s["rejected_input_ids"]
        n = len(chosen) - (s["chosen_labels"] != IGNORE_INDEX).sum()  # the prompt, identical in both rows
        assert chosen[:n].tolist() == rejected[:n].tolist() and chosen.tolist() != rejected.tolist()
        assert (s["rejected_labels"] != IGNORE_INDEX).any()
        image_tokens = 0 if ds.kinds[i] == "text" else 4 * len(s["pixel_values"])
        assert int((chosen == ctx).sum()) == int((rejected == ctx).sum()) == image_tokens
        assert ds.lengths[i] >= len(chosen) + len(rejected) - 4  # the estimate counts both rows


def test_the_longer_answer_decides_the_tiles_and_both_rows_fit(qwen2):
    whole = _dataset(qwen2)[0]  # astronaut.jpg: 6 tiles + thumbnail at 4 tokens each
    assert len(whole["pixel_values"]) == 5 and len(whole["chosen_input_ids"]) > len(whole["rejected_input_ids"])
    limit = len(whole["chosen_input_ids"]) - 4
    ds = _dataset(qwen2, max_seq_length=limit)
    p = ds.prepare(0)
    assert any(note.startswith("re-tiled") for note in p.notes)
    s = ds[0]
    assert len(s["pixel_values"]) < 5 and len(s["chosen_input_ids"]) <= limit
    assert s["chosen_input_ids"][:20].tolist() == s["rejected_input_ids"][:20].tolist()


def test_sample_is_clean(qwen2, tmp_path, capsys):
    assert main(["data", "check", str(SAMPLE / "preference_meta.json"), "--objective", "mpo"]) == 0
    qwen2.save_pretrained(tmp_path / "tok")
    code = main(["data", "check", str(SAMPLE / "preference_meta.json"), "--objective", "dpo", "--tokenizer",
                 str(tmp_path / "tok"), "--conv_style", "Hermes-2", "--show", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "(chosen, image" in out and "(rejected, image" in out and "clean: 0 error(s)" in out


def test_broken_preference_lines_are_reported_with_file_and_line(sample_copy, capsys):
    path = sample_copy / "preference.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    del rows[0]["rejected"]
    rows[1]["chosen"] = ["not", "a", "string"]
    rows[2]["rejected"] = "<image>\nThe same picture."
    rows[3]["question"] = "<image>\nOnly one placeholder for two images."
    rows[4]["rejected"] = rows[4]["chosen"]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    code = main(["data", "check", str(sample_copy / "preference_meta.json"), "--objective", "dpo"])
    out = " ".join(capsys.readouterr().out.split())  # rich may wrap long lines
    assert code == 1
    assert f"{path}:1: `rejected` is missing" in out
    assert f"{path}:2: `chosen` must be a string, got list" in out
    assert f"{path}:3: `rejected` contains <image> or <video> — placeholders belong in `question` only" in out
    assert f"{path}:4: `image` lists 2 image(s) but the human turns hold 1 <image>" in out
    assert f"{path}:5: `chosen` and `rejected` are the same text" in out
    assert "4 error(s), 1 warning(s)" in out
    main(["data", "check", str(sample_copy / "preference_meta.json")])  # without --objective
    assert "a preference line (question / chosen / rejected) in a supervised dataset" in capsys.readouterr().out


@pytest.mark.parametrize("field", ["question", "chosen"])
def test_reserved_tokens_are_refused_per_field(qwen2, sample_copy, field):
    from internvl_tune.errors import DataError

    path = sample_copy / "preference.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[4][field] += " <|im_end|>"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    ds = PreferenceDataset(sample_copy / "preference_meta.json", qwen2, DataConfig().resolve(TINY), strict=True)
    with pytest.raises(DataError, match=f"preference.jsonl:5: `{field}` contains the reserved token"):
        ds[4]
