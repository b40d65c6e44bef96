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


# ---- issue 20: rough but valid files, names given twice, where relative paths point --------------------------------

@pytest.mark.parametrize("text, numbers", [
    ('{"a": 1}\n{"a": 2}\n\n', [1, 2]),  # `echo >> train.jsonl` after a final newline
    ('{"a": 1}\n   \n\t\t\n{"a": 2}\r\n \r\n\t \r\n', [1, 4]),  # whitespace-only lines, CRLF ones too
    ('\ufeff\n{"a": 1}\n{"a": 2}', [2, 3]),  # a byte-order mark alone on the first line
    ('\ufeff{"a": 1}\n  {"a": 2}  \n', [1, 2]),  # a BOM before the first object; spaces around an object
])
def test_blank_and_whitespace_only_lines_are_skipped_with_real_line_numbers(tmp_path, text, numbers):
    path = tmp_path / "x.jsonl"
    path.write_bytes(text.encode())
    index = JsonlIndex(str(path))
    assert [index.line_number(i) for i in range(len(index))] == numbers
    assert [index.read(i)["a"] for i in range(len(index))] == [1, 2]


def test_meta_json_with_a_byte_order_mark(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    meta = tmp_path / "meta.json"
    meta.write_bytes("\ufeff".encode() + json.dumps({"ds": {"root": ".", "annotation": "a.jsonl"}}).encode())
    (spec,) = read_meta(meta)
    assert spec.name == "ds" and spec.line == 1


def test_a_dataset_name_given_twice_is_an_error_at_its_second_line(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text('{\n  "ds": {"root": "a", "annotation": "a.jsonl"},\n  "ds": {"root": "b", "annotation": "b.jsonl"}\n}\n')
    with pytest.raises(DataError, match="dataset name 'ds' is given twice \\(also at line 2\\)") as err:
        read_meta(meta)
    assert err.value.where == f"{meta}:3" and "own name" in err.value.fix


def test_a_key_given_twice_in_one_dataset_is_an_error(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text('{\n  "x": {"root": "r", "annotation": "x.jsonl"},\n  "ds": {"root": "a",\n'
                    '         "root": "b", "annotation": "a.jsonl"}\n}\n')
    with pytest.raises(DataError, match="dataset 'ds': key 'root' is given twice") as err:
        read_meta(meta)
    assert err.value.where == f"{meta}:4"


def _beside_and_here(tmp_path, monkeypatch):
    """A meta JSON in data/ naming root "images" and annotation "a.jsonl"; the run starts in work/."""
    data, work = tmp_path / "data", tmp_path / "work"
    (data / "images").mkdir(parents=True)
    work.mkdir()
    (data / "a.jsonl").write_text("{}\n")
    (data / "meta.json").write_text(json.dumps({"ds": {"root": "images", "annotation": "a.jsonl"}}))
    monkeypatch.chdir(work)
    return data, work


def test_relative_paths_start_from_the_current_directory_then_the_meta_folder(tmp_path, monkeypatch):
    data, work = _beside_and_here(tmp_path, monkeypatch)
    (spec,) = read_meta(data / "meta.json")  # only beside the meta file: used from anywhere
    assert spec.root == str(data / "images") and spec.annotation == str(data / "a.jsonl") and spec.notice is None
    assert spec.root_tried == (str(work / "images"), str(data / "images"))
    (work / "images").mkdir()  # now both exist: the current directory wins, and the spec says so
    (spec,) = read_meta(data / "meta.json")
    assert spec.root == "images" and spec.annotation == str(data / "a.jsonl")
    assert spec.notice == (f"dataset 'ds': root 'images' exists both in the current directory ({work / 'images'}) and "
                           f"beside the meta file ({data / 'images'}); using {work / 'images'} (the current directory "
                           "comes first; write an absolute path to choose)")


def test_a_missing_annotation_names_every_path_tried(tmp_path, monkeypatch):
    data, work = _beside_and_here(tmp_path, monkeypatch)
    (data / "a.jsonl").unlink()
    (spec,) = read_meta(data / "meta.json")
    with pytest.raises(DataError) as err:
        JsonlIndex.of(spec)
    assert f"annotation file not found: a.jsonl (looked for {work / 'a.jsonl'} and {data / 'a.jsonl'})" in str(err.value)


def test_blank_lines_are_found_across_read_blocks(tmp_path, monkeypatch):
    """Random files of objects, blank, whitespace-only and CRLF lines (a BOM sometimes), read in blocks of 1-9 bytes so
    that lines and their first bytes straddle block borders: the index holds exactly the lines a plain split finds
    non-blank."""
    import random

    import internvl_tune.data.meta as meta

    rng = random.Random(0)
    pieces = [b'{"a": 1}', b"", b"  ", b"\t", b" \r", b'{"a": 2}\r', b'  {"a": 3}', b"\r"]
    for trial in range(40):
        lines = [rng.choice(pieces) for _ in range(rng.randint(1, 12))]
        text = (b"\xef\xbb\xbf" if trial % 3 == 0 else b"") + b"\n".join(lines) + (b"\n" if trial % 2 else b"")
        path = tmp_path / f"{trial}.jsonl"
        path.write_bytes(text)
        parts = text.split(b"\n")
        parts = parts[:-1] if text.endswith(b"\n") else parts
        expected = [n + 1 for n, part in enumerate(parts)
                    if (part[3:] if n == 0 and part.startswith(b"\xef\xbb\xbf") else part).strip(b" \t\r")]
        for block in (1, 2, 3, 5, 9):
            monkeypatch.setattr(meta, "_BLOCK", block)
            index = JsonlIndex(str(path))
            assert [index.line_number(i) for i in range(len(index))] == expected, (text, block)
