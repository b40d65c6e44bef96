"""SupervisedDataset on the bundled sample: the four kinds, determinism, fitting into max_seq_length, collation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from internvl_tune.constants import IGNORE_INDEX
from internvl_tune.data import CheckpointDefaults, DataConfig, SupervisedDataset, frame_indices, load_video_frames
from internvl_tune.data.batching import pad_rows
from internvl_tune.errors import DataError

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"

# a tiny InternVL2-1B's settings: 56-px tiles of 4 tokens each, fast on CPU
TINY = CheckpointDefaults(template="Hermes-2", image_size=56, downsample_ratio=0.5, num_image_token=4,
                          dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12)
CFG = dict(max_dynamic_patch=6)


def _config(**kw) -> DataConfig:
    """The data settings as training resolves them against the tiny checkpoint."""
    return DataConfig(**kw).resolve(TINY)


@pytest.fixture(scope="module")
def dataset(qwen2):
    return SupervisedDataset(SAMPLE / "meta.json", qwen2, _config(**CFG), is_train=True, seed=0)


def by_id(ds, sample_id):
    return next(i for i in range(len(ds)) if ds.sample_id(i) == sample_id)


def test_kinds_lengths_and_sample_dicts(dataset, qwen2):
    assert len(dataset) == 6 + 14 + 4 * 2 + 4  # multi_image has repeat_time 2
    assert dataset.kinds.count("text") == 6 and dataset.kinds.count("video") == 4
    assert len(dataset.lengths) == len(dataset) == len(dataset.tiles)
    ctx = qwen2.convert_tokens_to_ids("<IMG_CONTEXT>")
    for i in (0, 6, 20, 28):
        s = dataset[i]
        assert set(s) == {"input_ids", "labels", "pixel_values", "image_flags", "sample_id"}
        assert s["pixel_values"].shape[1:] == (3, 56, 56) and len(s["image_flags"]) == len(s["pixel_values"])
        n_ctx = int((s["input_ids"] == ctx).sum())
        if dataset.kinds[i] == "text":
            assert s["image_flags"].tolist() == [0] and n_ctx == 0
        else:
            assert n_ctx == 4 * len(s["pixel_values"])  # every tile's tokens, nothing more
        assert (s["labels"] != IGNORE_INDEX).any()
        assert dataset.lengths[i] >= len(s["input_ids"]) - 2  # estimates are upper bounds up to rounding


def test_single_image_tiles_and_thumbnail(dataset):
    # image.jsonl line 3 is coffee.jpg (448x299, ratio 1.5): 3x2 grid of 6 tiles + thumbnail.
    s = dataset[by_id(dataset, "sample_image:3")]
    assert len(s["pixel_values"]) == 7


def test_multi_image_budget_is_split(dataset):
    # max_dynamic_patch 6 over 3 images -> at most 2 tiles each (+ thumbnail when > 1).
    s = dataset[by_id(dataset, "sample_multi_image:2")]
    assert 3 <= len(s["pixel_values"]) <= 9


def test_video_frames_are_reproducible_per_epoch(qwen2):
    ds = SupervisedDataset(SAMPLE / "meta.json", qwen2, _config(**CFG), is_train=True, seed=3)
    i = by_id(ds, "sample_video:2")  # coffee_zoom.mp4, 20 frames
    a, b = ds[i], ds[i]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    counts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        counts.add(len(ds[i]["pixel_values"]))
    assert all(8 <= c <= 20 for c in counts) and len(counts) > 1
    short = ds[by_id(ds, "sample_video:4")]  # 6-frame video: all frames, fewer than min_num_frame
    assert len(short["pixel_values"]) == 6


def test_jpeg_augmentation_only_where_data_augment(qwen2):
    ds = SupervisedDataset(SAMPLE / "meta.json", qwen2, _config(**CFG), is_train=True, seed=0)
    ev = SupervisedDataset(SAMPLE / "meta.json", qwen2, _config(**CFG), is_train=False, seed=0)
    img = by_id(ds, "sample_image:1")  # data_augment true
    multi = by_id(ds, "sample_multi_image:1")  # data_augment false
    assert not torch.equal(ds[img]["pixel_values"], ev[img]["pixel_values"])
    assert torch.equal(ds[multi]["pixel_values"], ev[multi]["pixel_values"])
    ds.set_epoch(1)
    assert torch.equal(ds[multi]["pixel_values"], ev[multi]["pixel_values"])


def test_frame_sampling():
    rng = np.random.default_rng(0)
    idx = frame_indices(8, 100, "rand", rng)
    assert len(idx) == 8 and all(12 * k <= i < 12 * (k + 1) + 4 for k, i in enumerate(idx))
    assert frame_indices(4, 8, "middle") == [0, 2, 4, 6]
    assert frame_indices(32, 5, "middle") == [0, 1, 2, 3, 4]
    frames, where = load_video_frames(str(SAMPLE / "videos" / "china_pan.mp4"), 4, "middle")
    assert where == [2, 8, 14, 20] and frames[0].mode == "RGB"


def test_too_long_samples_are_retiled_then_cut_then_dropped(qwen2, caplog):
    # sample_image:3 is 98 tokens with 7 tiles of 4 tokens, 74 with one tile.
    ds = SupervisedDataset(SAMPLE / "meta.json", qwen2, _config(**{**CFG, "max_seq_length": 80}), is_train=False)
    p = ds.prepare(by_id(ds, "sample_image:3"))
    assert any(n.startswith("re-tiled") for n in p.notes) and 70 < len(p.encoded.input_ids) <= 80
    ds = SupervisedDataset(SAMPLE / "meta.json", qwen2, _config(**{**CFG, "max_seq_length": 70}), is_train=False)
    p = ds.prepare(by_id(ds, "sample_text:3"))  # long text: the tail is cut (there are no image tokens to protect)
    assert any(n.startswith("truncated") for n in p.notes) and len(p.encoded.input_ids) == 70
    with pytest.raises(DataError, match="no answer token"):  # one tile fits but cutting would remove the answer
        ds.prepare(by_id(ds, "sample_image:3"))
    s = ds[by_id(ds, "sample_image:3")]  # training replaces it with a later usable sample and says so
    assert s["sample_id"] != "sample_image:3" and len(s["input_ids"]) <= 70
    (record,) = s["skipped"]
    assert record.sample_id == "sample_image:3" and "no answer token" in record.message and not record.media


def test_broken_sample_is_skipped_and_strict_raises(qwen2, sample_copy):
    lines = (sample_copy / "image.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["image"] = "missing.jpg"
    lines[0] = json.dumps(row)
    (sample_copy / "image.jsonl").write_text("\n".join(lines) + "\n")
    ds = SupervisedDataset(sample_copy / "meta.json", qwen2, _config(**CFG), is_train=False)
    i = by_id(ds, "sample_image:1")
    replaced = ds[i]
    assert replaced["sample_id"] == "sample_image:2" and [r.sample_id for r in replaced["skipped"]] == ["sample_image:1"]
    assert replaced["skipped"][0].media and replaced["skipped"][0].where == f"{sample_copy / 'image.jsonl'}:1"
    assert "skipped" not in ds[i + 1]
    strict = SupervisedDataset(sample_copy / "meta.json", qwen2, _config(**CFG), is_train=False, strict=True)
    with pytest.raises(DataError, match=r"image.jsonl:1: image not found"):
        strict[i]


def test_paths_may_not_leave_the_root(qwen2, sample_copy):
    (sample_copy / "image.jsonl").write_text(json.dumps({"image": "../videos/x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]}) + "\n")
    ds = SupervisedDataset(sample_copy / "meta.json", qwen2, _config(**CFG), strict=True)
    with pytest.raises(DataError, match="outside the dataset root"):
        ds[by_id(ds, "sample_image:1")]


def test_pad_rows():
    a = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "pixel_values": torch.zeros(2, 3, 4, 4),
         "image_flags": torch.tensor([1, 1]), "sample_id": "a:1"}
    b = {"input_ids": torch.tensor([0]), "labels": torch.tensor([0]), "pixel_values": torch.ones(1, 3, 4, 4),
         "image_flags": torch.tensor([0]), "sample_id": "b:1"}
    batch = pad_rows([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [0, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, False, False]]  # a real pad-id token counts
    assert batch["sample_index"].tolist() == [[0, 0, 0], [1, 1, 1]]


# ---- issue 20: one validator for data check and training -----------------------------------------------------------

def _turns(question, answer="A cat."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


DISAGREED = [  # lines `data check` refused while training used them (placeholders as literal text, a video ignored)
    ("image_count", {"image": ["chelsea.jpg", "coffee.jpg"], "conversations": _turns("<image>\nCompare.")},
     "`image` lists 2 image(s) but the human turns hold 1 <image> placeholder(s)"),
    ("two_for_one", {"image": "chelsea.jpg", "conversations": _turns("<image>\n<image>\nWhat?")},
     "single-image sample has 2 <image> placeholder(s)"),
    ("in_answer", {"image": "chelsea.jpg", "conversations": _turns("<image>\nWhat?", "This <image> shows a cat.")},
     "a gpt answer contains <image> or <video>"),
    ("text_with_placeholder", {"conversations": _turns("<image>\nWhat?")}, "pure-text sample"),
    ("video_placeholder_in_image", {"image": "chelsea.jpg", "conversations": _turns("<image>\n<video>\nWhat?")},
     "image sample contains 1 <video> placeholder(s) but no `video`"),
    ("image_and_video", {"image": "chelsea.jpg", "video": "x.mp4", "conversations": _turns("<image>\nWhat?")},
     "the line has both `image` and `video`"),
]


def test_training_refuses_exactly_what_data_check_refuses(qwen2, tmp_path):
    """Each line is an error for `data check` and the same DataError, word for word, for the training dataset."""
    from internvl_tune.data.check import check_meta

    rows = [case for _, case, _ in DISAGREED] + [{"image": "chelsea.jpg", "conversations": _turns("What?")}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": str(SAMPLE / "images"),
                                                          "annotation": str(tmp_path / "d.jsonl")}}))
    cfg = _config(**CFG)
    report = check_meta(str(tmp_path / "meta.json"), cfg, qwen2)
    reported = {p.where: str(p) for p in report.errors}
    ds = SupervisedDataset(tmp_path / "meta.json", qwen2, cfg, strict=True)
    for number, (name, _, message) in enumerate(DISAGREED, start=1):
        where = f"{tmp_path / 'd.jsonl'}:{number}"
        with pytest.raises(DataError) as err:
            ds[number - 1]
        assert message in str(err.value) and reported[where] == str(err.value), name
    assert len(report.errors) == len(DISAGREED) and ds[len(DISAGREED)]["sample_id"] == f"d:{len(DISAGREED) + 1}"


@pytest.mark.parametrize("content, repeat", [("", 1), ("\n  \n", 1), ('{"conversations": []}\n', 0)],
                         ids=["empty_file", "blank_lines_only", "repeat_time_0"])
def test_a_meta_json_that_gives_no_samples_is_a_data_error_for_both(qwen2, tmp_path, content, repeat):
    from internvl_tune.data.check import check_meta

    (tmp_path / "d.jsonl").write_text(content)
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": ".", "annotation": str(tmp_path / "d.jsonl"),
                                                          "repeat_time": repeat}}))
    with pytest.raises(DataError, match="the meta JSON gives no samples: dataset 'd' has") as err:
        SupervisedDataset(tmp_path / "meta.json", qwen2, _config(**CFG))
    assert err.value.where == f"{tmp_path / 'meta.json'}:1" and "repeat_time above 0" in err.value.fix
    report = check_meta(str(tmp_path / "meta.json"), _config(**CFG))
    assert [str(p) for p in report.errors] == [str(err.value)]


def test_an_image_missing_under_the_chosen_root_says_where_it_is(qwen2, tmp_path, monkeypatch):
    """root "images" exists in the current directory and beside the meta file; the image only in the latter."""
    data, work = tmp_path / "data", tmp_path / "work"
    (data / "images").mkdir(parents=True)
    (work / "images").mkdir(parents=True)
    (data / "images" / "cat.jpg").write_bytes((SAMPLE / "images" / "chelsea.jpg").read_bytes())
    (data / "d.jsonl").write_text(json.dumps({"image": "cat.jpg", "conversations": _turns("<image>\nWhat?")}) + "\n")
    (data / "meta.json").write_text(json.dumps({"d": {"root": "images", "annotation": "d.jsonl"}}))
    monkeypatch.chdir(work)
    ds = SupervisedDataset(data / "meta.json", qwen2, _config(**CFG), strict=True)
    assert ds.notices and "using " + str(work / "images") in ds.notices[0]
    with pytest.raises(DataError) as err:
        ds[0]
    assert (f"image not found: {work / 'images' / 'cat.jpg'}; it exists at {data / 'images' / 'cat.jpg'}, but root "
            "'images' is taken from the current directory first") in str(err.value)
    (work / "images").rmdir()  # then the root beside the meta file is the only one, and used from anywhere
    assert SupervisedDataset(data / "meta.json", qwen2, _config(**CFG), strict=True)[0]["sample_id"] == "d:1"
    (data / "images" / "cat.jpg").unlink()
    with pytest.raises(DataError, match=f"image not found: cat.jpg \\(looked for {work / 'images' / 'cat.jpg'} and "
                                        f"{data / 'images' / 'cat.jpg'}\\)"):
        SupervisedDataset(data / "meta.json", qwen2, _config(**CFG), strict=True)[0]
