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
