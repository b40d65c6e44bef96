"""Image-text retrieval data: Flickr30K / Flickr30K-CN / COCO Karpathy readers, custom datasets, transforms and the
training dataset of InternVL-C/G fine-tuning.

File formats (as the reference and clip_benchmark read them):

* Flickr30K txt (``flickr30k_{train,val,test}_karpathy.txt``, ``flickr30k_cn_{train,test}.txt``): a header line,
  then ``<image>.jpg,<caption>`` per line (the caption may contain commas; the split is at the first ``.jpg,``).
  Image ids are the integer file stems; images live under ``<root>`` (training) or ``<dataset_root>/Images`` (eval).
* COCO Karpathy json: a list of ``{"image": "val2014/COCO_val2014_...jpg", "caption": str | [str, ...],
  "image_id": "coco_123"?}`` (train files have one caption per entry, test files five per image).
* COCO captions json (clip_benchmark's ``coco_test_karpathy.json``): ``{"images": [...], "annotations": [...]}``.

Captions are cleaned like the reference's ``process_single_caption`` / clip_benchmark's ``pre_caption``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from internvl_tune.data.batching import TensorBatch
from internvl_tune.data.images import load_image, normalize, resize_normalize
from internvl_tune.errors import DataError, UserError
from internvl_tune.options import option

MAX_WORDS = 50
RETRIEVAL_PREFIX = "summarize:"
RETRIEVAL_MAX_LENGTH = 80
# Training datasets of the reference fine-tuning scripts (paths relative to the working directory, like the reference),
# each with its annotation format (a key of READERS).
BUILTIN_TRAIN_SETS = {
    "flickr30k_en_train": {"root": "./data/flickr30k/Images/", "annotation": "./data/flickr30k/flickr30k_train_karpathy.txt",
                           "format": "flickr_format"},
    "flickr30k_cn_train": {"root": "./data/flickr30k/Images/", "annotation": "./data/flickr30k/flickr30k_cn_train.txt",
                           "format": "flickr_format"},
    "coco_karpathy_train": {"root": "./data/coco/", "annotation": "./data/coco/annotations/coco_karpathy_train.json",
                            "format": "coco_format"},
}


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """Lower-case, turn ``.!"()*#:;~`` into spaces, collapse runs of whitespace, strip, keep the first 50 words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


# ----------------------------------------------------------------------------------------------- readers
def read_flickr_txt(path: str | Path) -> list[tuple[str, str]]:
    """``[(image file name, raw caption)]`` in file order; the header line is skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read the annotation file ({exc})", str(path), "check --dataset_root / the path") from None
    pairs = []
    for n, line in enumerate(lines[1:], start=2):
        line = line.strip()
        if not line:
            continue
        if ".jpg," not in line:
            raise DataError("expected `<image>.jpg,<caption>`", f"{path}:{n}", "fix the line or remove it")
        image, caption = line.split(".jpg,", 1)
        pairs.append((image + ".jpg", caption))
    return pairs


def read_coco_karpathy(path: str | Path) -> list[dict]:
    """Entries ``{"image", "captions": [str], "image_id": int}`` of a COCO Karpathy json (BLIP layout).

    ``image_id`` is the trailing integer of the given id (``coco_123`` -> 123) or of the file name.
    """
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return _coco_captions_format(data, path)
    if not isinstance(data, list):
        raise DataError("expected a JSON list of {image, caption} entries", str(path))
    out = []
    for n, entry in enumerate(data):
        where = f"{path}:entry {n}"
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise DataError("each entry needs `image` and `caption`", where)
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        raw_id = str(entry.get("image_id", Path(entry["image"]).stem))
        match = re.search(r"(\d+)$", raw_id)
        if not match:
            raise DataError(f"cannot read an integer image id from {raw_id!r}", where)
        out.append({"image": entry["image"], "captions": [str(c) for c in captions], "image_id": int(match.group(1))})
    return out


def _coco_captions_format(data: dict, path: Path) -> list[dict]:
    by_id: dict[int, dict] = {}
    for img in data["images"]:
        by_id[img["id"]] = {"image": img["file_name"], "captions": [], "image_id": int(img["id"])}
    for ann in data["annotations"]:
        if ann["image_id"] not in by_id:
            raise DataError(f"annotation for unknown image id {ann['image_id']}", str(path))
        by_id[ann["image_id"]]["captions"].append(ann["caption"])
    return list(by_id.values())


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read the annotation file ({exc})", str(path), "check the path") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg}", f"{path}:{exc.lineno}") from None


# ----------------------------------------------------------------------------------------------- datasets
@dataclass
class RetrievalEvalSet:
    """Images (paths) and, for each, its cleaned captions — in annotation order, as clip_benchmark builds them."""

    image_paths: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)

    @property
    def num_texts(self) -> int:
        return sum(len(c) for c in self.captions)

    def text_image_index(self) -> list[int]:
        """For each caption (flattened in order), the index of its image."""
        return [i for i, caps in enumerate(self.captions) for _ in caps]


def flickr_eval_set(annotation: str | Path, image_root: str | Path) -> RetrievalEvalSet:
    """Group a Flickr txt by image (first appearance order)."""
    groups: dict[str, list[str]] = {}
    for image, caption in read_flickr_txt(annotation):
        groups.setdefault(image, []).append(pre_caption(caption))
    return RetrievalEvalSet([str(Path(image_root) / k) for k in groups], list(groups.values()))


def coco_eval_set(annotation: str | Path, image_root: str | Path) -> RetrievalEvalSet:
    entries = read_coco_karpathy(annotation)
    return RetrievalEvalSet([str(Path(image_root) / e["image"]) for e in entries],
                            [[pre_caption(c) for c in e["captions"]] for e in entries])


def flickr_train_pairs(annotation: str | Path, root: str | Path) -> list[tuple[str, str, int]]:
    """``[(image path, cleaned caption, image id)]`` of a Flickr txt; image ids are the integer file stems."""
    pairs = []
    for n, (image, caption) in enumerate(read_flickr_txt(annotation)):
        stem = Path(image).stem
        if not stem.isdigit():
            raise DataError(f"Flickr image names must be integers, got {image!r}", f"{annotation}:{n + 2}")
        pairs.append((str(Path(root) / image), pre_caption(caption), int(stem)))
    return pairs


def coco_train_pairs(annotation: str | Path, root: str | Path) -> list[tuple[str, str, int]]:
    """``[(image path, cleaned caption, image id)]`` of a COCO Karpathy json, one pair per caption."""
    return [(str(Path(root) / e["image"]), pre_caption(c), e["image_id"])
            for e in read_coco_karpathy(annotation) for c in e["captions"]]


@dataclass(frozen=True)
class RetrievalReader:
    """How one annotation format is read, for evaluation and for training."""

    eval_set: Callable[[str | Path, str | Path], RetrievalEvalSet]  # (annotation, image root)
    train_pairs: Callable[[str | Path, str | Path], list[tuple[str, str, int]]]  # (annotation, image root)


# The annotation formats. A custom dataset's name carries its format's key (``my_flickr_format``), as in the
# reference; a new format is one entry here.
READERS = {
    "flickr_format": RetrievalReader(flickr_eval_set, flickr_train_pairs),
    "coco_format": RetrievalReader(coco_eval_set, coco_train_pairs),
}


def reader_for(name: str) -> RetrievalReader:
    """The reader of a dataset: a built-in training set's own format, else the format its name carries."""
    if name in BUILTIN_TRAIN_SETS:
        return READERS[BUILTIN_TRAIN_SETS[name]["format"]]
    key = next((k for k in READERS if k in name), None)
    if key is None:
        raise DataError(f"dataset name {name!r} names no annotation format",
                        fix=f"rename it to contain one of {', '.join(READERS)} (that picks the reader)")
    return READERS[key]


def load_dataset_registry(path: str | Path) -> dict[str, dict]:
    """Read custom datasets ``{name: {"root": ..., "annotation": ...}}`` from a JSON or YAML file.

    Names must contain ``flickr_format`` or ``coco_format`` (that picks the reader, as in the reference).
    Relative paths are resolved against the registry file's directory.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else None
    if text is None:
        raise DataError("dataset registry file not found", str(path))
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError("expected a mapping {name: {root, annotation}}", str(path))
    out = {}
    for name, spec in data.items():
        if not any(key in name for key in READERS):
            raise DataError(f"dataset name {name!r} must contain {' or '.join(f'`{k}`' for k in READERS)}", str(path),
                            "rename it so the right annotation reader is used")
        if not isinstance(spec, dict) or not {"root", "annotation"} <= set(spec):
            raise DataError(f"{name}: needs `root` and `annotation`", str(path))
        out[name] = {k: str((path.parent / spec[k]).resolve()) if not Path(spec[k]).is_absolute() else spec[k]
                     for k in ("root", "annotation")}
    return out


def train_pairs(name: str, spec: dict) -> list[tuple[str, str, int]]:
    """``[(image path, cleaned caption, image id)]`` of a training set, read by the reader of its name."""
    return reader_for(name).train_pairs(spec["annotation"], spec["root"])


# ----------------------------------------------------------------------------------------------- text
def tokenize_retrieval(
    tokenizer,
    texts: list[str],
    prefix: str = RETRIEVAL_PREFIX,
    max_length: int = RETRIEVAL_MAX_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[N, max_length]`` for ``prefix + text``, right-padded with id 0.

    The tokenizer must have been loaded with ``add_eos_token=True``.
    """
    return padded_tokens(tokenizer, [prefix + t for t in texts], "right", max_length=max_length, truncation=True,
                         padding="max_length")


def padded_tokens(tokenizer, texts: list[str], side: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``texts`` padded on ``side`` (``kwargs`` go to the tokenizer)."""
    # transformers' LLaMA tokenizer defaults to left padding; the reference's slow one padded right. Be explicit.
    saved = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        enc = tokenizer(texts, return_tensors="pt", **kwargs)
    finally:
        tokenizer.padding_side = saved
    return enc["input_ids"], enc["attention_mask"]


# ----------------------------------------------------------------------------------------------- transforms
def eval_transform(image: Image.Image, size: int) -> torch.Tensor:
    """Retrieval evaluation: bicubic resize to ``size x size`` (no crop), ImageNet normalisation."""
    return resize_normalize(image, size)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.5, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` by torchvision's RandomResizedCrop rule: 10 tries of a random area fraction and log-uniform
    aspect ratio, else a centre crop clamped to the ratio range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(image: Image.Image, size: int, rng: np.random.Generator) -> torch.Tensor:
    """BLIP-2-style training augmentation: random resized crop (scale 0.5-1, bicubic), horizontal flip (p=0.5)."""
    image = image.convert("RGB")
    left, top, w, h = random_resized_crop_box(image.width, image.height, rng)
    image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return normalize(image)


# ----------------------------------------------------------------------------------------------- training data
@dataclass
class RetrievalDataArgs:
    """Data flags of InternVL-C/G retrieval fine-tuning (the reference's ``DataTrainingArguments``)."""

    dataset_name: str = option("flickr30k_en_train", "flickr30k_en_train, flickr30k_cn_train, coco_karpathy_train, "
                                                     "or a name from --custom_datasets")
    custom_datasets: str | None = option(None, "JSON/YAML registry {name: {root, annotation}}; names contain "
                                               "flickr_format or coco_format")
    data_root: str = option("./data", "folder holding flickr30k/ and coco/ for the built-in dataset names")
    max_seq_length: int = option(80, "caption tokens, EOS included; captions are padded to this length")
    force_image_size: int | None = option(None, "input resolution in pixels (default: the checkpoint's: its "
                                                "force_image_size, else its ViT's image_size); another size "
                                                "interpolates the position embeddings, e.g. 364 for a 224 px "
                                                "checkpoint")


def dataset_spec(d: RetrievalDataArgs) -> dict:
    """``{"root", "annotation"}`` of ``--dataset_name``: a custom registry entry, or a built-in set under ``--data_root``."""
    registry = load_dataset_registry(d.custom_datasets) if d.custom_datasets else {}
    if d.dataset_name in registry:
        return registry[d.dataset_name]
    if d.dataset_name in BUILTIN_TRAIN_SETS:  # the reference's ./data/... paths, re-rooted at --data_root
        return {k: str(Path(d.data_root) / Path(v).relative_to("data"))
                for k, v in BUILTIN_TRAIN_SETS[d.dataset_name].items() if k in ("root", "annotation")}
    known = sorted(BUILTIN_TRAIN_SETS) + sorted(registry)
    raise UserError(f"--dataset_name {d.dataset_name!r} is unknown; choose one of {', '.join(known)}, or register it "
                    f"in a --custom_datasets file ({{name: {{root, annotation}}}}, name containing flickr_format or "
                    f"coco_format)")


def build_train_dataset(d: RetrievalDataArgs, tokenizer, seed: int) -> RetrievalTrainDataset:
    """The training set named by ``--dataset_name`` (its image folder must exist)."""
    spec = dataset_spec(d)
    if not Path(spec["root"]).is_dir():
        raise DataError(f"image folder of {d.dataset_name} not found", spec["root"],
                        "pass --data_root (the folder holding flickr30k/ and coco/), e.g. --data_root examples/sample; "
                        "`internvl-tune data prepare` lists what to download")
    return RetrievalTrainDataset(train_pairs(d.dataset_name, spec), tokenizer, d.force_image_size, d.max_seq_length,
                                 seed=seed)


@dataclass
class RetrievalBatch(TensorBatch):
    """One micro-batch of (image, caption) pairs: the ITM positive and negative captions, the ITC caption."""

    pixel_values: torch.Tensor  # [B, 3, S, S]
    positive_input_ids: torch.Tensor  # [B, max_seq_length] each, padded with 0
    positive_attention_mask: torch.Tensor
    negative_input_ids: torch.Tensor
    negative_attention_mask: torch.Tensor
    summarize_input_ids: torch.Tensor
    summarize_attention_mask: torch.Tensor
    image_ids: torch.Tensor  # [B]
    weight: float = 1.0  # every micro-step is its own contrastive batch: the step averages them
    work: int = 0  # samples

    @classmethod
    def collate(cls, samples: list[dict]) -> RetrievalBatch:
        """The DataLoader's ``collate_fn``: stack the samples' tensors."""
        return cls(**{k: torch.stack([s[k] for s in samples]) for k in samples[0]}, work=len(samples))


# ----------------------------------------------------------------------------------------------- training dataset
class RetrievalTrainDataset(torch.utils.data.Dataset):
    """(image, caption) pairs for ITC + ITM fine-tuning, one sample per caption.

    Each sample carries the augmented image, its caption tokenized plain (ITM positive), a caption of a different
    image (ITM negative, drawn uniformly as the reference does) and ``'summarize:' + caption`` (ITC), all with EOS
    and padded with 0 to ``max_seq_length``, plus its ``image_ids``. The negative choice and the augmentation are
    drawn from ``(seed, epoch, index)``, so a run is reproducible and independent of worker count and order.
    """

    def __init__(self, pairs: list[tuple[str, str, int]], tokenizer, image_size: int, max_seq_length: int = 80,
                 seed: int = 0, augment: bool = True):
        if len({p[2] for p in pairs}) < 2:
            raise DataError("a retrieval training set needs captions of at least two different images (ITM negatives)")
        self.pairs, self.tokenizer = pairs, tokenizer
        self.image_size, self.max_seq_length = image_size, max_seq_length
        self.seed, self.epoch, self.augment = seed, 0, augment

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def negative_index(self, i: int, rng: np.random.Generator) -> int:
        """A uniformly random index whose image differs from sample ``i``'s (rejection sampling, as the reference)."""
        own = self.pairs[i][2]
        while True:
            j = int(rng.integers(0, len(self.pairs)))
            if self.pairs[j][2] != own:
                return j

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        path, caption, image_id = self.pairs[i]
        negative = self.pairs[self.negative_index(i, rng)][1]
        image = load_image(path, where=f"sample {i}")
        pixel_values = train_transform(image, self.image_size, rng) if self.augment else eval_transform(image, self.image_size)
        ids, mask = tokenize_retrieval(self.tokenizer, [caption, negative], max_length=self.max_seq_length, prefix="")
        sum_ids, sum_mask = tokenize_retrieval(self.tokenizer, [caption], max_length=self.max_seq_length)
        return {
            "pixel_values": pixel_values,
            "positive_input_ids": ids[0], "positive_attention_mask": mask[0],
            "negative_input_ids": ids[1], "negative_attention_mask": mask[1],
            "summarize_input_ids": sum_ids[0], "summarize_attention_mask": sum_mask[0],
            "image_ids": torch.tensor(image_id, dtype=torch.long),
        }
