"""Retrieval test sets are one table (eval/retrieval.BENCHMARKS) and annotation formats one more (data/retrieval.
READERS): the lookups the seeds' commands rely on, and the errors."""

from __future__ import annotations

import json

import pytest

from internvl_tune.data.retrieval import READERS, reader_for
from internvl_tune.errors import DataError, UserError
from internvl_tune.eval.retrieval import BENCHMARKS, resolve_dataset


def test_coco_layouts_and_alias(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/coco_karpathy_test.json").write_text(json.dumps(
        [{"image": "val2014/COCO_val2014_000000000042.jpg", "caption": ["A cat.", "A pet"]}]))
    listed = resolve_dataset("mscoco_captions", str(tmp_path), "test", "en")  # the alias of coco
    assert listed.image_paths == [str(tmp_path / "val2014/COCO_val2014_000000000042.jpg")]
    assert listed.captions == [["a cat", "a pet"]]
    (tmp_path / "annotations/coco_karpathy_test.json").unlink()
    (tmp_path / "coco_test_karpathy.json").write_text(json.dumps(  # clip_benchmark's captions format: split folder
        {"images": [{"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}],
         "annotations": [{"image_id": 7, "caption": "Two dogs"}]}))
    captions = resolve_dataset("coco", str(tmp_path), "test", "en")
    assert captions.image_paths == [str(tmp_path / "val2014/COCO_val2014_000000000007.jpg")]


def test_readers_by_name_and_errors(tmp_path):
    assert reader_for("flickr30k_en_train") is READERS["flickr_format"]
    assert reader_for("coco_karpathy_train") is READERS["coco_format"]
    assert reader_for("my_coco_format") is READERS["coco_format"]
    with pytest.raises(DataError, match="flickr_format"):
        reader_for("mine")
    with pytest.raises(UserError, match="mscoco_captions"):
        resolve_dataset("imagenet", str(tmp_path), "test", "en")
    with pytest.raises(UserError, match="no 'de' annotations"):
        resolve_dataset("flickr30k", str(tmp_path), "test", "de")
    assert all(b.format in READERS for b in BENCHMARKS.values())
