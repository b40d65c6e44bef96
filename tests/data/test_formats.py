"""Line formats of ms-swift (messages) and LLaMA-Factory (ShareGPT) become the InternVL line written by hand."""

import pytest

from internvl_tune.data.formats import EmbeddedImage, FormatOptions, convert, detect, format_options
from internvl_tune.errors import DataError

# One multi-image conversation with a system message, in the InternVL format (the reference's chat data format)
INTERNVL = {"id": 7, "image": ["a.jpg", "b.jpg"], "conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "<image>\n<image>\nWhat differs?"},
    {"from": "gpt", "value": "The colour."},
    {"from": "human", "value": "And the size?"},
    {"from": "gpt", "value": "Same."}]}
# ... as ms-swift writes it
SWIFT = {"id": 7, "images": ["a.jpg", "b.jpg"], "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "<image>\n<image>\nWhat differs?"},
    {"role": "assistant", "content": "The colour."},
    {"role": "user", "content": "And the size?"},
    {"role": "assistant", "content": "Same."}]}
# ... as LLaMA-Factory's ShareGPT writes it (system in its own column)
SHAREGPT = {"id": 7, "system": "Be brief.", "images": ["a.jpg", "b.jpg"], "conversations": [
    {"from": "human", "value": "<image>\n<image>\nWhat differs?"},
    {"from": "gpt", "value": "The colour."},
    {"from": "human", "value": "And the size?"},
    {"from": "gpt", "value": "Same."}]}


@pytest.mark.parametrize("line, name", [(INTERNVL, "internvl"), (SWIFT, "messages"), (SHAREGPT, "sharegpt")])
def test_each_format_is_detected_and_converts_to_the_internvl_line(line, name):
    assert detect(line) == name
    assert convert(line, name, FormatOptions(), "f.jsonl:1") == INTERNVL


def test_openai_content_parts_become_placeholders_and_one_image_a_path():
    line = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "\nWhat is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}
    assert convert(line, "messages", FormatOptions(), None) == {
        "image": "cat.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                              {"from": "gpt", "value": "A cat."}]}


def test_sharegpt_with_role_content_turns_and_a_video():
    line = {"conversations": [{"role": "user", "content": "<video>Describe."}, {"role": "assistant", "content": "Rain."}],
            "videos": ["clip.mp4"]}
    assert detect(line) == "sharegpt"
    assert convert(line, "sharegpt", FormatOptions(), None) == {
        "video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>Describe."},
                                               {"from": "gpt", "value": "Rain."}]}


def test_configured_columns_and_tags_as_in_llamafactory_dataset_info():
    name, options = format_options({"format": "sharegpt", "columns": {"messages": "dialog", "images": "pics"},
                                    "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "q",
                                             "assistant_tag": "a"}}, "meta.json:2")
    line = {"pics": ["x.jpg"], "dialog": [{"speaker": "q", "text": "<image>Hi"}, {"speaker": "a", "text": "Hello"}]}
    assert convert(line, name, options, None) == {
        "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Hello"}]}


def test_embedded_images_of_parquet_rows():
    line = {"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "!"}],
            "images": [{"bytes": b"\x89PNG...", "path": "p.png"}, {"bytes": None, "path": "q.png"}]}
    assert convert(line, "messages", FormatOptions(), None)["image"] == [EmbeddedImage(b"\x89PNG...", "p.png"), "q.png"]


@pytest.mark.parametrize("line, message", [
    ({"messages": [{"role": "tool", "content": "{}"}]}, "role 'tool' is not supported"),
    ({"messages": []}, "`messages` \\(the turns\\) is missing or empty"),
    ({"messages": [{"role": "user", "content": "<video>"}], "videos": ["a.mp4", "b.mp4"]}, "2 videos in one line"),
    ({"messages": [{"role": "user", "content": "x"}], "images": [3]}, "`images` must hold paths"),
])
def test_lines_that_do_not_fit_name_their_place(line, message):
    with pytest.raises(DataError, match=message) as info:
        convert(line, "messages", FormatOptions(), "data/train.jsonl:12")
    assert info.value.where == "data/train.jsonl:12"


def test_meta_entry_format_keys_are_checked():
    with pytest.raises(DataError, match="unknown format 'alpaca'"):
        format_options({"format": "alpaca"}, "meta.json:3")
    with pytest.raises(DataError, match=r"`tags` has unknown key\(s\) \['observation_tag'\]"):
        format_options({"tags": {"observation_tag": "tool"}}, "meta.json:3")


# ---------------------------------------------------------------------------------------------- through the readers
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from internvl_tune.data.config import CheckpointDefaults, DataConfig  # noqa: E402
from internvl_tune.data.dataset import SupervisedDataset  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"
TINY = CheckpointDefaults(template="Hermes-2", image_size=56, downsample_ratio=0.5, num_image_token=4,
                          dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12)
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _swift(line: dict) -> dict:
    """An InternVL line written by hand as ms-swift would hold it."""
    images = line.get("image", [])
    return {"messages": [{"role": ROLES[t["from"]], "content": t["value"]} for t in line["conversations"]],
            "images": images if isinstance(images, list) else [images]}


def _llamafactory(line: dict) -> dict:
    """... and as a LLaMA-Factory ShareGPT dataset with its own column and tag names."""
    images = line.get("image", [])
    return {"dialog": [{"speaker": {"human": "q", "gpt": "a"}[t["from"]], "text": t["value"]}
                       for t in line["conversations"]], "pics": images if isinstance(images, list) else [images]}


def _meta(tmp_path: Path, name: str, lines: list[dict], **entry) -> Path:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    meta = tmp_path / f"{name}_meta.json"
    meta.write_text(json.dumps({name: {"root": str(SAMPLE / "images"), "annotation": str(path), **entry}}))
    return meta


def _samples(meta, tokenizer) -> list[dict]:
    ds = SupervisedDataset(meta, tokenizer, DataConfig(max_dynamic_patch=6).resolve(TINY), is_train=False, strict=True)
    return [ds[i] for i in range(len(ds))]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for key in ("input_ids", "labels", "pixel_values", "image_flags"):
            assert torch.equal(x[key], y[key]), key


@pytest.fixture(scope="module")
def internvl_lines():
    return [json.loads(x) for name in ("image.jsonl", "multi_image.jsonl")
            for x in (SAMPLE / name).read_text().splitlines()[:3]]


def test_ms_swift_and_llamafactory_files_train_exactly_as_the_internvl_file(qwen2, tmp_path, internvl_lines):
    reference = _samples(_meta(tmp_path, "internvl", internvl_lines), qwen2)
    _same(_samples(_meta(tmp_path, "swift", [_swift(x) for x in internvl_lines]), qwen2), reference)
    factory = _meta(tmp_path, "factory", [_llamafactory(x) for x in internvl_lines], format="sharegpt",
                    columns={"messages": "dialog", "images": "pics"},
                    tags={"role_tag": "speaker", "content_tag": "text", "user_tag": "q", "assistant_tag": "a"})
    _same(_samples(factory, qwen2), reference)


def test_a_parquet_file_with_embedded_images_trains_as_the_files_do(qwen2, tmp_path, internvl_lines):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = []
    for line in internvl_lines:
        row = _swift(line)
        row["images"] = [{"bytes": (SAMPLE / "images" / p).read_bytes(), "path": p} for p in row["images"]]
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet", row_group_size=2)
    meta = tmp_path / "pq_meta.json"
    meta.write_text(json.dumps({"pq": {"root": str(tmp_path), "annotation": str(tmp_path / "train.parquet")}}))
    _same(_samples(meta, qwen2), _samples(_meta(tmp_path, "internvl", internvl_lines), qwen2))


def test_data_check_shows_the_format_and_names_rows_and_lines(qwen2, tmp_path, internvl_lines):
    from internvl_tune.data.check import check_meta

    lines = [_swift(x) for x in internvl_lines]
    lines[1]["messages"][0]["role"] = "tool"
    report = check_meta(str(_meta(tmp_path, "swift", lines)), DataConfig(max_dynamic_patch=6).resolve(TINY), qwen2)
    assert report.formats == {"swift": "messages (detected)"}
    assert [(p.where, p.message[:28]) for p in report.errors] == [(f"{tmp_path / 'swift.jsonl'}:2",
                                                                   "role 'tool' is not supported")]
