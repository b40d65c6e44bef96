"""Meta JSON validation, repeat_time, and the lazy JSONL byte-offset index."""

from __future__ import annotations

import json

import pytest

from internvl_tune.data import DatasetSpec, JsonlIndex, read_meta
from internvl_tune.errors import DataError


def write_meta(tmp_path, entry, name="ds"):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({name: entry}, indent=2))
    return path


def test_paths_resolve_next_to_the_meta_file(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text("{}\n")
    meta = write_meta(tmp_path, {"root": "imgs/", "annotation": "a.jsonl", "data_augment": True, "repeat_time": 0.5,
                                 "length": 1, "max_dynamic_patch": 6})
    monkeypatch.chdir("/")
    (spec,) = read_meta(meta)
    assert spec.annotation == str(tmp_path / "a.jsonl") and spec.data_augment and spec.max_dynamic_patch == 6


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"root": "r"}, "`annotation` is missing"),
        ({"root": "r", "annotation": "a.json"}, "not a .jsonl"),
        ({"root": "r", "annotation": "a.jsonl", "repeat_time": 2.5}, "not a whole number"),
        ({"root": "r", "annotation": "a.jsonl", "repeat_time": -1}, ">= 0"),
        ({"root": "r", "annotation": "a.jsonl", "data_augment": "yes"}, "true or false"),
        ({"root": "r", "annotation": "a.jsonl", "colour": 1}, "unknown key"),
        ({"root": "s3://bucket/", "annotation": "a.jsonl"}, "petrel"),
    ],
)
def test_meta_errors(tmp_path, entry, message):
    with pytest.raises(DataError, match=message) as err:
        read_meta(write_meta(tmp_path, entry))
    assert err.value.where.startswith(str(tmp_path / "meta.json") + ":2") and err.value.fix


def test_meta_bad_json_names_the_line(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{\n  "ds": {"root": "r",\n}\n')
    with pytest.raises(DataError, match="invalid JSON") as err:
        read_meta(path)
    assert err.value.where == f"{path}:3"


def test_repeat_time_keeps_a_prefix_or_repeats():
    spec = DatasetSpec("d", "r", "a.jsonl", repeat_time=0.5)
    assert spec.num_samples(10) == 5 and [spec.line_of(i, 10) for i in range(5)] == [0, 1, 2, 3, 4]
    spec = DatasetSpec("d", "r", "a.jsonl", repeat_time=3)
    assert spec.num_samples(4) == 12 and [spec.line_of(i, 4) for i in range(12)] == [0, 1, 2, 3] * 3


@pytest.mark.parametrize("text", ['{"a": 1}\n\n{"a": 2}\r\n \n{"a": 3}', '{"a": 1}\n{"a": 2}\n{"a": 3}\n'])
def test_index_skips_empty_lines_and_keeps_line_numbers(tmp_path, text):
    path = tmp_path / "x.jsonl"
    path.write_bytes(text.encode())
    index = JsonlIndex(str(path))
    assert len(index) == 3 and index.offsets.dtype.name == "int64"
    assert [index.read(i)["a"] for i in range(3)] == [1, 2, 3]
    numbers = [index.line_number(i) for i in range(3)]
    assert numbers == ([1, 3, 5] if "\n\n" in text else [1, 2, 3])


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2,}\n[1, 2]\n')
    index = JsonlIndex(str(path))
    with pytest.raises(DataError, match="invalid JSON") as err:
        index.read(1)
    assert err.value.where == f"{path}:2"
    with pytest.raises(DataError, match="not an object"):
        index.read(2)


def test_index_spans_read_blocks(tmp_path, monkeypatch):
    import internvl_tune.data.meta as meta

    monkeypatch.setattr(meta, "_BLOCK", 7)  # lines straddle block borders
    path = tmp_path / "x.jsonl"
    rows = [{"i": i, "pad": "x" * (i % 5)} for i in range(50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = JsonlIndex(str(path))
    assert [index.read(i) for i in range(50)] == rows


def test_missing_annotation(tmp_path):
    with pytest.raises(DataError, match="not found"):
        JsonlIndex(str(tmp_path / "nope.jsonl"))
