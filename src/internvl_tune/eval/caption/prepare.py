"""``data prepare``: check the COCO / Flickr30K / NoCaps tree the InternVL docs prescribe, and fill in what we can.

For each dataset we know every file the caption and retrieval evaluators read, and how the InternVL docs say to get
it. The check lists each missing file with that command, counts images, verifies that every image an annotation
names exists, and writes ``flickr30k_test_karpathy.json`` from ``flickr30k_test_karpathy.txt`` when only the txt is
there (the conversion the InternVL release file was made with, so scores match the published ones).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from internvl_tune.errors import UserError
from internvl_tune.eval.caption.datasets import BENCHMARKS, describe_missing, load_images, load_references

INTERNVL_RELEASE = "https://github.com/OpenGVLab/InternVL/releases/download/data"
CLIP_BENCHMARK_RELEASE = "https://github.com/mehdidc/retrieval_annotations/releases/download/1.0.0"
TASKS = ("caption", "retrieval")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class Needed:
    """One file or folder of the layout: which tasks read it, how to get it, and its size in the full release."""

    path: str  # relative to the dataset folder (data/coco, ...)
    tasks: tuple[str, ...]
    how: str  # a shell command, or a sentence where no download command exists; {dir} is the dataset folder
    full_count: int | None = None  # images in a complete folder (only folders)


def _wget(url: str, subdir: str = "") -> str:
    return f"wget -P {{dir}}{'/' + subdir if subdir else ''} {url}"


def _coco_zip(name: str) -> str:
    # A subshell, so pasting the command leaves the user's shell where it was.
    return f"(cd {{dir}} && wget http://images.cocodataset.org/zips/{name}.zip && unzip -q {name}.zip)"


LAYOUT: dict[str, list[Needed]] = {
    "coco": [
        Needed("annotations/coco_karpathy_test.json", ("caption",),
               _wget(f"{INTERNVL_RELEASE}/coco_karpathy_test.json", "annotations")),
        Needed("annotations/coco_karpathy_test_gt.json", ("caption",),
               _wget(f"{INTERNVL_RELEASE}/coco_karpathy_test_gt.json", "annotations")),
        Needed("annotations/coco_karpathy_train.json", ("retrieval",),
               _wget("https://storage.googleapis.com/sfr-vision-language-research/datasets/coco_karpathy_train.json",
                     "annotations")),
        Needed("val2014", ("caption", "retrieval"), _coco_zip("val2014"), 40504),
        Needed("train2014", ("retrieval",), _coco_zip("train2014"), 82783),
    ],
    "flickr30k": [
        Needed("Images", ("caption", "retrieval"),
               "download the Flickr30K images from https://bryanplummer.com/Flickr30kEntities/ (or, as clip_benchmark "
               "does, `kaggle datasets download -d adityajn105/flickr30k`) and unpack them into {dir}/Images/", 31783),
        Needed("flickr30k_test_karpathy.json", ("caption",), _wget(f"{INTERNVL_RELEASE}/flickr30k_test_karpathy.json")
               + "   (or get flickr30k_test_karpathy.txt and run this command again to convert it)"),
        Needed("flickr30k_test_karpathy.txt", ("retrieval",),
               _wget(f"{CLIP_BENCHMARK_RELEASE}/flickr30k_test_karpathy.txt")),
        Needed("flickr30k_train_karpathy.txt", ("retrieval",),
               _wget(f"{CLIP_BENCHMARK_RELEASE}/flickr30k_train_karpathy.txt")),
        Needed("flickr30k_val_karpathy.txt", ("retrieval",),
               _wget(f"{CLIP_BENCHMARK_RELEASE}/flickr30k_val_karpathy.txt")),
        Needed("flickr30k_cn_test.txt", ("retrieval",), _wget(f"{INTERNVL_RELEASE}/flickr30k_cn_test.txt")),
        Needed("flickr30k_cn_train.txt", ("retrieval",), _wget(f"{INTERNVL_RELEASE}/flickr30k_cn_train.txt")),
    ],
    "nocaps": [
        Needed("images", ("caption",),
               "download the NoCaps validation images from https://nocaps.org/download into {dir}/images/", 4500),
        Needed("nocaps_val_4500_captions.json", ("caption",),
               _wget("https://nocaps.s3.amazonaws.com/nocaps_val_4500_captions.json")),
    ],
}


@dataclass
class PrepareReport:
    """What ``check_dataset`` found: printable lines, and whether anything the chosen tasks need is missing."""

    name: str
    lines: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, how to get it)
    problems: list[str] = field(default_factory=list)  # present but wrong: unreadable, images missing
    converted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.problems


def convert_flickr_txt(txt: Path, out: Path, keep_commas: bool = False) -> int:
    """Write the COCO-format json of a clip_benchmark Flickr30K Karpathy txt; returns the number of images.

    The txt has a header line, then ``<file>.jpg,<caption>`` per caption. Image ids are the numeric file stems,
    file names get the ``Images/`` prefix, annotation ids count from 0. The InternVL release json cut each caption
    at its first comma; that is the default here so scores equal the published ones. ``keep_commas`` keeps the
    whole caption instead.
    """
    images: dict[int, dict] = {}
    annotations = []
    with open(txt, encoding="utf-8") as f:
        lines = f.read().splitlines()[1:]
    for lineno, line in enumerate(lines, start=2):
        line = line.strip()
        if not line:
            continue
        if keep_commas:
            name, sep, caption = line.partition(".jpg,")
            name += ".jpg"
        else:
            name, sep, caption = line.partition(",")
            caption = caption.split(",")[0]
        if not sep:
            raise UserError(f"{txt}:{lineno}: expected '<image>.jpg,<caption>', got {line[:80]!r}")
        try:
            image_id = int(name.split(".")[0])
        except ValueError:
            raise UserError(f"{txt}:{lineno}: image name {name!r} is not a Flickr30K number") from None
        images.setdefault(image_id, {"id": image_id, "file_name": "Images/" + name})
        annotations.append({"image_id": image_id, "caption": caption, "id": len(annotations)})
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"images": list(images.values()), "annotations": annotations}))
    os.replace(tmp, out)  # never leave a half-written json that the evaluator would read
    return len(images)


def _count_images(folder: Path) -> int:
    return sum(1 for e in os.scandir(folder) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)


def _missing_images(paths: list[Path], dirs: list[Path], report: PrepareReport, label: str) -> None:
    missing = describe_missing(paths, dirs)
    if missing:
        report.problems.append(f"{label}: {missing}")
    else:
        report.lines.append(f"  ok       {label}: all {len(paths)} images present")


def _check_caption_split(name: str, data_root: Path, report: PrepareReport) -> None:
    """Parse the caption benchmark's files, check ids against the ground truth and every image on disk."""
    bench = BENCHMARKS[name]
    try:
        images = load_images(bench, data_root)
        refs = load_references(data_root / bench.ground_truth)
    except UserError as exc:
        report.problems.append(str(exc))
        return
    note = "" if len(images) == bench.split_size else f" (the full test split has {bench.split_size})"
    report.lines.append(f"  ok       {bench.annotation}: {len(images)} images to caption{note}")
    no_refs = [i.image_id for i in images if not refs.get(i.image_id)]
    if no_refs:
        report.problems.append(f"{bench.ground_truth}: {len(no_refs)} image id(s) have no reference caption, "
                               f"e.g. {no_refs[:5]}")
    _missing_images([i.path for i in images], bench.image_dirs(data_root), report, f"{name} caption images")


def _check_retrieval_files(name: str, folder: Path, report: PrepareReport) -> None:
    """Check that the images the retrieval annotations name exist (clip_benchmark's txt, the BLIP train json)."""
    if name == "flickr30k":
        for txt in sorted(folder.glob("flickr30k*_karpathy.txt")) + sorted(folder.glob("flickr30k_cn_*.txt")):
            names = []
            for line in txt.read_text(encoding="utf-8").splitlines()[1:]:
                head, sep, _ = line.strip().partition(".jpg,")
                if sep:
                    names.append(head + ".jpg")
            images = folder / "Images"
            _missing_images([images / n for n in dict.fromkeys(names)], [images], report, txt.name)
    elif name == "coco" and (folder / "annotations/coco_karpathy_train.json").is_file():
        path = folder / "annotations/coco_karpathy_train.json"
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
            files = list(dict.fromkeys(e["image"] for e in entries))
        except (json.JSONDecodeError, TypeError, KeyError):
            report.problems.append(f"{path}: expected a JSON list of {{'image': ..., 'caption': ...}} entries")
            return
        _missing_images([folder / f for f in files], [folder], report, path.name)


def check_dataset(name: str, data_root: str | Path, tasks=TASKS, convert: bool = True,
                  keep_commas: bool = False) -> PrepareReport:
    """Check one dataset folder of the layout.

    Args:
        name: coco, flickr30k or nocaps.
        data_root: the folder holding the dataset folders (``data``).
        tasks: which evaluators to check for: "caption", "retrieval" or both.
        convert: write flickr30k_test_karpathy.json from the txt when only the txt exists.
        keep_commas: keep whole captions in that conversion (see :func:`convert_flickr_txt`).
    """
    if name not in LAYOUT:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(LAYOUT)}")
    data_root = Path(data_root)
    folder = data_root / name
    report = PrepareReport(name)
    report.lines.append(f"{name} ({folder})")
    txt, js = folder / "flickr30k_test_karpathy.txt", folder / "flickr30k_test_karpathy.json"
    if name == "flickr30k" and "caption" in tasks and convert and txt.is_file() and not js.is_file():
        count = convert_flickr_txt(txt, js, keep_commas)
        report.converted.append(str(js))
        report.lines.append(f"  wrote    {js.name} from {txt.name} ({count} images)")
    for item in LAYOUT[name]:
        if not set(item.tasks) & set(tasks):
            continue
        path = folder / item.path
        how = item.how.replace("{dir}", shlex.quote(str(folder)))
        if not path.exists():
            report.missing.append((str(path), how))
            report.lines.append(f"  MISSING  {item.path}  (needed for {' and '.join(item.tasks)})")
            report.lines.append(f"           get it: {how}")
        elif path.is_dir():
            count = _count_images(path)
            if count == 0:
                report.problems.append(f"{path}/ holds no images — {how}")
                continue
            note = "" if item.full_count in (None, count) else f" (the full release has {item.full_count})"
            report.lines.append(f"  ok       {item.path}/: {count} images{note}")
        else:
            report.lines.append(f"  ok       {item.path}")
    caption_files = [folder.parent / p for p in (BENCHMARKS[name].annotation, BENCHMARKS[name].ground_truth)]
    if "caption" in tasks and all(p.is_file() for p in caption_files):
        _check_caption_split(name, data_root, report)
    if "retrieval" in tasks:
        _check_retrieval_files(name, folder, report)
    for problem in report.problems:
        report.lines.append(f"  PROBLEM  {problem}")
    return report
