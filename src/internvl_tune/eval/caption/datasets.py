"""Readers for the caption test sets in the layout the InternVL docs prescribe (COCO Karpathy, Flickr30K, NoCaps).

Each benchmark has two files: a list of images to caption and a COCO-format ground truth (``images`` +
``annotations``). For Flickr30K and NoCaps one file is both. Paths are relative to the data root (``data/``)::

    coco/annotations/coco_karpathy_test.json       list of {"image": "val2014/COCO_val2014_000000391895.jpg", ...}
    coco/annotations/coco_karpathy_test_gt.json    COCO-format references, images resolved under coco/
    flickr30k/flickr30k_test_karpathy.json         {"images": [{"id", "file_name"}], "annotations": [...]},
                                                   images resolved under flickr30k/, then flickr30k/Images/ (the
                                                   InternVL release names "<n>.jpg", our conversion "Images/<n>.jpg")
    nocaps/nocaps_val_4500_captions.json           {"images": [{"id", "file_name"}], "annotations": [...]},
                                                   images under nocaps/images/
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from internvl_tune.errors import DataError, UserError


@dataclass(frozen=True)
class CaptionBenchmark:
    """Where one benchmark's files lie, relative to the data root."""

    name: str
    image_roots: tuple[str, ...]  # folders the annotation's image paths may be relative to, tried in order
    annotation: str  # the images to caption
    ground_truth: str  # COCO-format reference captions
    split_size: int  # images in the full test split, for the size check in `data prepare`

    def image_dirs(self, data_root: str | Path) -> list[Path]:
        """The image folders under ``data_root``, in the order files are looked up in."""
        return [Path(data_root) / r for r in self.image_roots]


BENCHMARKS: dict[str, CaptionBenchmark] = {
    "coco": CaptionBenchmark(
        "coco", ("coco",), "coco/annotations/coco_karpathy_test.json", "coco/annotations/coco_karpathy_test_gt.json",
        5000,
    ),
    "flickr30k": CaptionBenchmark(
        "flickr30k", ("flickr30k", "flickr30k/Images"), "flickr30k/flickr30k_test_karpathy.json",
        "flickr30k/flickr30k_test_karpathy.json", 1000
    ),
    "nocaps": CaptionBenchmark(
        "nocaps", ("nocaps/images",), "nocaps/nocaps_val_4500_captions.json", "nocaps/nocaps_val_4500_captions.json",
        4500,
    ),
}


@dataclass(frozen=True)
class CaptionImage:
    """One image to caption: the id its prediction is scored under, and its file."""

    image_id: int
    path: Path


def get_benchmark(name: str) -> CaptionBenchmark:
    """Look a benchmark up by name, with the list of known names in the error."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UserError(f"unknown caption dataset {name!r}; choose from {', '.join(BENCHMARKS)}") from None


def parse_dataset_names(text: str) -> list[str]:
    """Split ``coco,flickr30k`` into names, checking each one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("--datasets is empty; give a comma-separated list such as coco,flickr30k,nocaps")
    for name in names:
        get_benchmark(name)
    return names


def read_json(path: Path):
    """Load a JSON file, turning a missing or broken file into a DataError that says where."""
    if not path.is_file():
        raise DataError("file not found", where=str(path), fix="run `internvl-tune data prepare` to see how to get it")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from None


def coco_image_id(filename: str) -> int:
    """The COCO image id is the number after the last underscore: ``COCO_val2014_000000391895.jpg`` -> 391895."""
    return int(Path(filename).stem.rsplit("_", 1)[-1])


def resolve_image(filename: str, dirs: Sequence[Path]) -> Path:
    """The first ``dir / filename`` that is a file; under the first folder when none is (reported as missing)."""
    for folder in dirs:
        if (folder / filename).is_file():
            return folder / filename
    return dirs[0] / filename


def describe_missing(paths: Sequence[Path], dirs: Sequence[Path]) -> str:
    """Empty when every file exists, else how many are absent, a few of their names, and every folder looked in.

    ``paths`` lie under ``dirs[0]`` when absent (see :func:`resolve_image`).
    """
    absent = [p for p in paths if not p.is_file()]
    if not absent:
        return ""
    shown = ", ".join(str(p.relative_to(dirs[0])) for p in absent[:3])
    folders = [f"{d}/" for d in dirs]
    looked = folders[0] if len(folders) == 1 else f"{', '.join(folders[:-1])} and {folders[-1]}"
    return f"{len(absent)} of {len(paths)} image file(s) not found, e.g. {shown}; looked in {looked}"


def _int_id(value, where: str) -> int:
    # Result files store ids as int (pycocotools matches them against the ground truth by value).
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"image id {value!r} is not an integer", where=where)
    return value


def load_images(benchmark: CaptionBenchmark, data_root: str | Path) -> list[CaptionImage]:
    """Read the list of images to caption, in file order (the order results are written in).

    Args:
        benchmark: which benchmark.
        data_root: the folder holding ``coco/``, ``flickr30k/`` and ``nocaps/``.

    Returns:
        One :class:`CaptionImage` per entry of the annotation file, its path under the first of the benchmark's
        image folders that holds the file.
    """
    root = Path(data_root)
    path = root / benchmark.annotation
    data = read_json(path)
    dirs = benchmark.image_dirs(root)
    images = []
    if benchmark.name == "coco":
        if not isinstance(data, list):
            raise DataError("expected a JSON list of {'image': ...} entries (the Karpathy test list)", where=str(path))
        for i, entry in enumerate(data):
            where = f"{path}: entry {i}"
            filename = entry.get("image") if isinstance(entry, dict) else None
            if not isinstance(filename, str):
                raise DataError("entry has no 'image' file name", where=where)
            try:
                image_id = coco_image_id(filename)
            except ValueError:
                raise DataError(f"cannot read a COCO image id from {filename!r}", where=where,
                                fix="COCO file names end in _<number>.jpg") from None
            images.append(CaptionImage(image_id, resolve_image(filename, dirs)))
        return images
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DataError("expected a COCO-format object with an 'images' list", where=str(path))
    for i, entry in enumerate(entries):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or "id" not in entry:
            raise DataError("image entry has no 'id'", where=where)
        filename = entry.get("file_name", entry.get("image"))
        if not isinstance(filename, str):
            raise DataError("image entry has neither 'file_name' nor 'image'", where=where)
        images.append(CaptionImage(_int_id(entry["id"], where), resolve_image(filename, dirs)))
    return images


def load_references(path: str | Path) -> dict[int, list[str]]:
    """Read COCO-format reference captions as ``{image_id: [caption, ...]}``.

    The order is the one pycocoevalcap's ``COCOEvalCap`` scores in: images in the order of the file's ``images``
    list (first appearance in ``annotations`` when the file has no ``images``), captions in annotation order.
    Floating-point sums in the scorers follow this order, so keeping it keeps scores bit-identical.
    """
    path = Path(path)
    data = read_json(path)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise DataError("expected a COCO-format object with an 'annotations' list", where=str(path))
    refs: dict[int, list[str]] = {}
    for i, entry in enumerate(data.get("images") or []):
        refs.setdefault(_int_id(entry.get("id") if isinstance(entry, dict) else None, f"{path}: images[{i}]"), [])
    has_images = bool(refs)
    for i, ann in enumerate(annotations):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            raise DataError("annotation has no 'caption' string", where=where)
        image_id = _int_id(ann.get("image_id"), where)
        if image_id in refs:
            refs[image_id].append(ann["caption"])
        elif not has_images:
            refs[image_id] = [ann["caption"]]
    return refs
