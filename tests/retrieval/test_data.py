"""Retrieval readers, caption clean-up, registry, transforms and the training dataset."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_tune.data.retrieval import (
    RetrievalTrainDataset,
    coco_eval_set,
    flickr_eval_set,
    load_dataset_registry,
    pre_caption,
    random_resized_crop_box,
    read_coco_karpathy,
    read_flickr_txt,
    train_pairs,
    train_transform,
)
from internvl_tune.errors import DataError


def test_pre_caption():
    assert pre_caption("A Dog (brown)  runs: fast!!\n") == "a dog brown runs fast"
    assert pre_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    assert pre_caption("一只猫。") == "一只猫。"


def test_flickr_reader_splits_at_first_jpg_and_groups(tmp_path):
    ann = tmp_path / "a.txt"
    ann.write_text("image,caption\n1.jpg,A man, a plan.\n2.jpg,Two\n1.jpg,Again\n\n")
    assert read_flickr_txt(ann) == [("1.jpg", "A man, a plan."), ("2.jpg", "Two"), ("1.jpg", "Again")]
    ds = flickr_eval_set(ann, tmp_path / "Images")
    assert [p.split("/")[-1] for p in ds.image_paths] == ["1.jpg", "2.jpg"]
    assert ds.captions == [["a man, a plan", "again"], ["two"]] and ds.text_image_index() == [0, 0, 1]
    ann.write_text("image,caption\nno separator here\n")
    with pytest.raises(DataError, match=r"a.txt:2"):
        read_flickr_txt(ann)


def test_coco_formats(tmp_path):
    blip = tmp_path / "test.json"
    blip.write_text(json.dumps([{"image": "val2014/COCO_val2014_000000000042.jpg", "caption": ["A.", "B"]}]))
    assert read_coco_karpathy(blip)[0]["image_id"] == 42
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"image": "x.jpg", "caption": "A cat.", "image_id": "coco_7"}]))
    assert train_pairs("coco_karpathy_train", {"root": str(tmp_path), "annotation": str(train)}) == [
        (str(tmp_path / "x.jpg"), "a cat", 7)]
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"images": [{"id": 5, "file_name": "a.jpg"}],
                                "annotations": [{"image_id": 5, "caption": "One"}, {"image_id": 5, "caption": "Two"}]}))
    assert coco_eval_set(caps, tmp_path).captions == [["one", "two"]]


def test_registry_requires_format_in_name(tmp_path):
    reg = tmp_path / "reg.yaml"
    reg.write_text("my_flickr_format:\n  root: images/\n  annotation: ann.txt\n")
    spec = load_dataset_registry(reg)["my_flickr_format"]
    assert spec["root"] == str((tmp_path / "images").resolve())
    reg.write_text(json.dumps({"mine": {"root": "a", "annotation": "b"}}))
    with pytest.raises(DataError, match="flickr_format"):
        load_dataset_registry(reg)


def test_random_resized_crop_box_in_bounds_and_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y, w, h = random_resized_crop_box(120, 80, rng)
        assert 0 <= x and 0 <= y and x + w <= 120 and y + h <= 80
        assert 0.5 * 9600 * 0.8 <= w * h <= 9600  # scale 0.5-1 (rounding aside)


def test_train_transform_deterministic_given_rng():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    a = train_transform(img, 28, np.random.default_rng([1, 2]))
    b = train_transform(img, 28, np.random.default_rng([1, 2]))
    assert a.shape == (3, 28, 28) and torch.equal(a, b)


def test_train_dataset_negatives_and_tokens(tiny_ckpt, sample_dir):
    from internvl_tune.models.internvl_cg.tokenizer import load_tokenizer

    spec = {"root": str(sample_dir / "flickr30k" / "Images"),
            "annotation": str(sample_dir / "flickr30k" / "flickr30k_train_karpathy.txt")}
    pairs = train_pairs("flickr30k_en_train", spec)
    tok = load_tokenizer(tiny_ckpt, add_eos_token=True)
    ds = RetrievalTrainDataset(pairs, tok, image_size=28, seed=3)
    s0, s1 = ds[0], ds[0]
    assert all(torch.equal(s0[k], s1[k]) for k in s0)  # deterministic given (seed, epoch, index)
    assert s0["pixel_values"].shape == (3, 28, 28) and s0["positive_input_ids"].shape == (80,)
    assert s0["image_ids"].item() == pairs[0][2]
    for i in range(len(ds)):
        j = ds.negative_index(i, np.random.default_rng([3, 0, i]))
        assert pairs[j][2] != pairs[i][2]
    # the ITC text is 'summarize:' + the ITM positive text, both ending with EOS
    n = int(s0["positive_attention_mask"].sum())
    assert s0["positive_input_ids"][n - 1] == tok.eos_token_id
    assert int(s0["summarize_attention_mask"].sum()) > n
