"""Readers for the reference caption files: image ids, paths and reference order."""

from __future__ import annotations

import json

import pytest

from internvl_tune.errors import DataError, UserError
from internvl_tune.eval.caption.datasets import (
    BENCHMARKS,
    coco_image_id,
    describe_missing,
    load_images,
    load_references,
    parse_dataset_names,
)


def test_coco_ids_come_from_the_file_name_suffix(data_root):
    images = load_images(BENCHMARKS["coco"], data_root)
    assert [i.image_id for i in images] == [391895 + 17 * k for k in range(5)]
    assert images[0].path == data_root / "coco/val2014/COCO_val2014_000000391895.jpg"
    assert all(i.path.is_file() for i in images)
    assert coco_image_id("val2014/COCO_val2014_000000000042.jpg") == 42


def test_flickr_and_nocaps_use_the_json_ids_and_their_image_roots(data_root):
    flickr = load_images(BENCHMARKS["flickr30k"], data_root)
    assert [i.image_id for i in flickr][:2] == [1000092795, 1000092796]
    assert flickr[0].path == data_root / "flickr30k/Images/1000092795.jpg"
    nocaps = load_images(BENCHMARKS["nocaps"], data_root)
    assert [i.image_id for i in nocaps] == [0, 1, 2, 3, 4]
    assert nocaps[1].path == data_root / "nocaps/images/0001ea2087020901.jpg"
    assert all(i.path.is_file() for i in flickr + nocaps)


def test_flickr_bare_file_names_resolve_under_images(bare_flickr_root):
    images = load_images(BENCHMARKS["flickr30k"], bare_flickr_root)
    assert len(images) == 6
    assert images[0].path == bare_flickr_root / "flickr30k/Images/1000100.jpg"
    assert all(i.path.is_file() for i in images)


def test_missing_images_name_every_folder_looked_in(bare_flickr_root):
    (bare_flickr_root / "flickr30k/Images/1000101.jpg").unlink()
    bench = BENCHMARKS["flickr30k"]
    images = load_images(bench, bare_flickr_root)
    assert images[1].path == bare_flickr_root / "flickr30k/1000101.jpg"  # under the first folder when absent
    root = bare_flickr_root / "flickr30k"
    assert describe_missing([i.path for i in images], bench.image_dirs(bare_flickr_root)) == (
        f"1 of 6 image file(s) not found, e.g. 1000101.jpg; looked in {root}/ and {root}/Images/")
    assert describe_missing([i.path for i in images if i.path.is_file()], bench.image_dirs(bare_flickr_root)) == ""


def test_references_follow_the_ground_truth_image_order(tmp_path):
    gt = {"images": [{"id": 9}, {"id": 3}],
          "annotations": [{"image_id": 3, "caption": "b1"}, {"image_id": 9, "caption": "a1"},
                          {"image_id": 3, "caption": "b2"}, {"image_id": 77, "caption": "not an image"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    refs = load_references(tmp_path / "gt.json")
    assert list(refs.items()) == [(9, ["a1"]), (3, ["b1", "b2"])]
    del gt["images"]  # without an image list, first appearance in the annotations sets the order
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert list(load_references(tmp_path / "gt.json")) == [3, 9, 77]


def test_bad_files_raise_data_errors_with_the_place(tmp_path, data_root):
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(DataError, match=r"broken.json:1: not valid JSON"):
        load_references(tmp_path / "broken.json")
    with pytest.raises(DataError, match="file not found.*data prepare"):
        load_references(tmp_path / "absent.json")
    path = data_root / BENCHMARKS["coco"].annotation
    path.write_text(json.dumps([{"image": "val2014/COCO_val2014_000000000001.jpg"}, {"caption": ["no image"]}]))
    with pytest.raises(DataError, match=r"coco_karpathy_test.json: entry 1: entry has no 'image'"):
        load_images(BENCHMARKS["coco"], data_root)
    path = data_root / BENCHMARKS["nocaps"].annotation
    path.write_text(json.dumps({"images": [{"id": "x1", "file_name": "a.jpg"}]}))
    with pytest.raises(DataError, match=r"images\[0\].*not an integer"):
        load_images(BENCHMARKS["nocaps"], data_root)


def test_dataset_names_are_checked():
    assert parse_dataset_names("coco, nocaps") == ["coco", "nocaps"]
    with pytest.raises(UserError, match="unknown caption dataset 'cocoo'; choose from coco, flickr30k, nocaps"):
        parse_dataset_names("cocoo")
