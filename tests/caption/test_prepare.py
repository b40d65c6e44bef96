"""`data prepare`: missing files with the commands to get them, image checks, Flickr30K txt -> json."""

from __future__ import annotations

import json
import shutil

from internvl_tune.cli import main
from internvl_tune.eval.caption.datasets import BENCHMARKS, load_images, load_references
from internvl_tune.eval.caption.prepare import check_dataset, convert_flickr_txt

RELEASE = "https://github.com/OpenGVLab/InternVL/releases/download/data"


def test_incomplete_tree_names_each_missing_file_and_its_command(data_root, capsys):
    (data_root / "coco/annotations/coco_karpathy_test_gt.json").unlink()
    shutil.rmtree(data_root / "nocaps")
    code = main(["data", "prepare", "coco", "nocaps", "--root", str(data_root), "--task", "caption"])
    out = capsys.readouterr().out
    assert code == 1
    coco, nocaps = str(data_root / "coco"), str(data_root / "nocaps")
    assert "MISSING  annotations/coco_karpathy_test_gt.json  (needed for caption)" in out
    assert f"get it: wget -P {coco}/annotations {RELEASE}/coco_karpathy_test_gt.json" in out
    assert "MISSING  nocaps_val_4500_captions.json" in out
    assert f"get it: wget -P {nocaps} https://nocaps.s3.amazonaws.com/nocaps_val_4500_captions.json" in out
    assert "MISSING  images  (needed for caption)" in out
    assert f"from https://nocaps.org/download into {nocaps}/images/" in out
    assert "ok       annotations/coco_karpathy_test.json" in out
    assert "ok       val2014/: 5 images (the full release has 40504)" in out
    assert "3 missing file(s), 0 problem(s) in coco, nocaps" in out
    assert "train2014" not in out  # retrieval-only files are not asked for with --task caption


def test_retrieval_files_and_image_checks(data_root):
    report = check_dataset("coco", data_root)  # caption and retrieval
    missing = dict(report.missing)
    assert set(missing) == {str(data_root / "coco/annotations/coco_karpathy_train.json"), str(data_root / "coco/train2014")}
    assert missing[str(data_root / "coco/train2014")] == (
        f"(cd {data_root / 'coco'} && wget http://images.cocodataset.org/zips/train2014.zip && unzip -q train2014.zip)")
    assert "  ok       coco caption images: all 5 images present" in report.lines
    assert "  ok       coco/annotations/coco_karpathy_test.json: 5 images to caption (the full test split has 5000)" \
        in report.lines
    (data_root / "flickr30k/Images/1000092797.jpg").unlink()
    report = check_dataset("flickr30k", data_root, tasks=("caption",))
    assert report.missing == [] and not report.ok
    for path in (data_root / "flickr30k/Images").iterdir():
        path.unlink()
    (empty,) = check_dataset("flickr30k", data_root, tasks=("caption",)).problems[:1]
    assert empty.startswith(f"{data_root / 'flickr30k/Images'}/ holds no images — download the Flickr30K images from")
    folder = data_root / "flickr30k"
    assert report.problems == [f"flickr30k caption images: 1 of 5 image file(s) not found, e.g. "
                               f"Images/1000092797.jpg; looked in {folder}/ and {folder}/Images/"]


def test_flickr_release_json_with_bare_file_names(bare_flickr_root, capsys):
    args = ["data", "prepare", "flickr30k", "--root", str(bare_flickr_root), "--task", "caption"]
    assert main(args) == 0
    assert "ok       flickr30k caption images: all 6 images present" in capsys.readouterr().out
    (bare_flickr_root / "flickr30k/Images/1000103.jpg").unlink()
    assert main(args) == 1
    folder = bare_flickr_root / "flickr30k"
    assert (f"flickr30k caption images: 1 of 6 image file(s) not found, e.g. 1000103.jpg; "
            f"looked in {folder}/ and {folder}/Images/") in capsys.readouterr().out


def test_flickr_txt_is_converted_like_the_release_json(data_root, capsys):
    folder = data_root / "flickr30k"
    (folder / "flickr30k_test_karpathy.json").unlink()
    (folder / "flickr30k_test_karpathy.txt").write_text(
        "image,caption\n"
        "1000092795.jpg,Two young guys with shaggy hair look at their hands.\n"
        "1000092795.jpg,Two friends enjoy time spent together, outside.\n"
        "1000092796.jpg,A man in a blue shirt, a hat, and jeans.\n"
    )
    code = main(["data", "prepare", "flickr30k", "--root", str(data_root), "--task", "caption"])
    assert "wrote    flickr30k_test_karpathy.json from flickr30k_test_karpathy.txt (2 images)" in capsys.readouterr().out
    assert code == 0
    data = json.loads((folder / "flickr30k_test_karpathy.json").read_text())
    assert data == {
        "images": [{"id": 1000092795, "file_name": "Images/1000092795.jpg"},
                   {"id": 1000092796, "file_name": "Images/1000092796.jpg"}],
        "annotations": [
            {"image_id": 1000092795, "caption": "Two young guys with shaggy hair look at their hands.", "id": 0},
            {"image_id": 1000092795, "caption": "Two friends enjoy time spent together", "id": 1},
            {"image_id": 1000092796, "caption": "A man in a blue shirt", "id": 2},
        ],
    }
    assert [i.image_id for i in load_images(BENCHMARKS["flickr30k"], data_root)] == [1000092795, 1000092796]
    out = folder / "kept.json"
    convert_flickr_txt(folder / "flickr30k_test_karpathy.txt", out, keep_commas=True)
    assert load_references(out)[1000092796] == ["A man in a blue shirt, a hat, and jeans."]
