"""The supervised fine-tuning dataset: meta JSON + JSONL lines -> sample dicts for the training loop.

Each line is one of four kinds, told apart as the reference does:

| kind          | line has                         | images                                            |
|---------------|----------------------------------|---------------------------------------------------|
| `text`        | no `image`, no `video`           | one dummy white tile, ``image_flags = [0]``, no image tokens |
| `image`       | `image`: a path                  | tiled with up to ``max_dynamic_patch`` tiles      |
| `multi_image` | `image`: a list of paths         | each tiled with up to ``max(1, max_dynamic_patch // n)`` |
| `video`       | `video`: a path                  | ``min_num_frame..max_num_frame`` frames, one tile each |

Samples are reproducible: every random choice (JPEG qualities, frame count and frames) comes from a generator
seeded with ``(seed, epoch, index)``, so a resumed run sees the same pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from internvl_tune.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from internvl_tune.data.annotations import Annotations
from internvl_tune.data.config import DataConfig
from internvl_tune.data.formats import EmbeddedImage
from internvl_tune.data.images import (
    ImageTransform,
    dynamic_preprocess,
    load_image,
    num_tiles,
    tiles_to_tensor,
)
from internvl_tune.data.lengths import conversation_texts, estimate_lines
from internvl_tune.data.meta import DatasetSpec, read_meta, require_samples, sample_kind
from internvl_tune.data.preprocess import Encoded, build_conversation_ids, parse_conversations, tokenizer_info
from internvl_tune.data.rules import check_rules
from internvl_tune.data.templates import GPT, HUMAN, get_template
from internvl_tune.data.video import load_video_frames
from internvl_tune.errors import DataError, MediaError, problem_line

MAX_TRIES = 100  # a broken sample is replaced by the next usable one; this many unusable in a row stop the run


def resolve_path(root: str, rel: str, allow_outside_root: bool, where: str | None = None) -> str:
    """``root/rel``; a path that leaves ``root`` (absolute, through ``..`` or a symlink) is refused unless allowed.

    Both sides are compared after resolving symlinks, so a ``root`` that is itself a link (to a mounted disk) works,
    while a link inside ``root`` pointing elsewhere is refused like ``../``.
    """
    if isinstance(rel, EmbeddedImage):  # the bytes are in the annotation file: no path to resolve
        return rel
    path = os.path.join(root, rel)
    if not allow_outside_root:
        base = os.path.realpath(root)
        full = os.path.realpath(path)
        if os.path.commonpath([base, full]) != base:
            link = "" if os.path.commonpath([os.path.abspath(root), os.path.abspath(path)]) != os.path.abspath(root) \
                else f" (through a symlink to {full})"
            raise DataError(f"path {rel!r} points outside the dataset root {root!r}{link}", where,
                            "make it relative to `root`, or pass --allow_outside_root")
    return path


def media_path(spec: DatasetSpec, rel: str, allow_outside_root: bool, where: str | None = None, what: str = "image") -> str:
    """The file an ``image`` / ``video`` entry of ``spec`` names; a missing one is a MediaError naming every place
    looked in (the root in the current directory, then beside the meta file: ``DatasetSpec.root_tried``)."""
    path = resolve_path(spec.root, rel, allow_outside_root, where)
    if isinstance(path, EmbeddedImage) or os.path.lexists(path):
        return path
    tried = [os.path.join(r, rel) for r in spec.root_tried] or [os.path.abspath(path)]
    elsewhere = [p for p in tried[1:] if os.path.exists(p)]
    if elsewhere:
        raise MediaError(f"{what} not found: {tried[0]}; it exists at {elsewhere[0]}, but root {spec.root!r} is taken "
                         "from the current directory first", where,
                         "run from the meta file's folder, or write the dataset's root as an absolute path")
    raise MediaError(f"{what} not found: {rel} (looked for {' and '.join(tried)})", where,
                     "fix the path (it is relative to the dataset's root) or the root in the meta JSON")


def conversation_messages(item: dict, template, where: str | None = None):
    """``parse_conversations`` of a supervised line; a preference line (no ``conversations``) gets its own error."""
    if "conversations" not in item and "chosen" in item:
        raise DataError("a preference line (question / chosen / rejected) in a supervised dataset", where,
                        "train and check preference data with --objective dpo or --objective mpo")
    return parse_conversations(item.get("conversations"), template, where)


def first_human(messages: list[tuple[str, str]]) -> int:
    """Index of the first human turn, where a missing ``<image>`` / ``<video>`` placeholder is prepended."""
    return next((k for k, (role, _) in enumerate(messages) if role == HUMAN), 0)


def frame_lines(n: int) -> str:
    """What ``<video>`` becomes: one ``Frame-i: <image>`` line per frame (the reference's wording)."""
    return "\n".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(n))


def expand_video_placeholder(text: str, n_frames: int) -> str:
    """Replace the first ``<video>`` (and the newline after it) by the frame lines and a newline."""
    if VIDEO_PLACEHOLDER + "\n" in text:
        return text.replace(VIDEO_PLACEHOLDER + "\n", frame_lines(n_frames) + "\n", 1)
    return text.replace(VIDEO_PLACEHOLDER, frame_lines(n_frames) + "\n", 1)


@dataclass
class Prepared:
    """Everything about one sample except the pixel tensors: what ``data check`` inspects."""

    sample_id: str
    where: str
    kind: str
    encoded: Encoded
    tiles: list[list[Image.Image]]  # per image (or frame): its tiles
    augment: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class Parsed:
    """A line that passed every rule that needs no file: its kind, system message, ``(role, text)`` turns and warnings.

    A gpt turn's text may be several: a preference pair's ``(chosen, rejected)``, an evaluation line's references.
    """

    item: dict
    kind: str
    system: str | None
    messages: list[tuple[str, object]]
    warnings: list[str]


@dataclass(frozen=True)
class SkipRecord:
    """A sample training could not use: which, where, why (picklable, so data-loader workers can hand it over).

    Attributes:
        sample_id: ``dataset:line``.
        where: ``file:line``.
        message: what is wrong.
        fix: how to fix it.
        media: an image or video file failed (it may have changed since ``data check``), not the line itself.
    """

    sample_id: str
    where: str
    message: str
    fix: str | None
    media: bool

    @classmethod
    def of(cls, exc: DataError, sample_id: str, where: str) -> SkipRecord:
        return cls(sample_id, exc.where or where, exc.message, exc.fix, isinstance(exc, MediaError))

    def __str__(self) -> str:
        return problem_line(self.message, self.where, self.fix)


def truncation_note(tokens: int, limit: int) -> str:
    """What ``data check`` warns and training notes about a sample cut to ``--max_seq_length``."""
    return f"truncated from {tokens} to {limit} tokens"


@dataclass(frozen=True)
class Truncation:
    """A sample training cut to ``--max_seq_length`` (its tail is not trained on), picklable like :class:`SkipRecord`.

    Attributes:
        sample_id: ``dataset:line``.
        where: ``file:line``.
        tokens: its length before the cut.
        limit: ``--max_seq_length``.
    """

    sample_id: str
    where: str
    tokens: int
    limit: int

    def __str__(self) -> str:
        return problem_line(truncation_note(self.tokens, self.limit), self.where)


class SupervisedDataset(Dataset):
    """Map-style dataset over all datasets of a meta JSON (concatenated in meta order).

    Args:
        meta_or_specs: a meta JSON path, or DatasetSpec objects.
        tokenizer: tokenizer with the InternVL special tokens.
        cfg: data settings, resolved against the checkpoint (``DataConfig.resolve``).
        is_train: training set (random frames, JPEG augmentation where ``data_augment``) or evaluation set.
        seed: base seed of every per-sample random choice.
        strict: raise on a broken sample instead of replacing it with the next one.

    Raises:
        DataError: when the datasets give no sample at all, or the tokenizer lacks the template's tokens.
    """

    rows_per_sample = 1  # token rows a sample becomes (a preference pair: 2), for the length estimates
    line_texts = staticmethod(conversation_texts)  # the texts of a line whose tokens the length estimate counts
    truncates = True  # a sample longer than --max_seq_length loses its tail (``Truncation``), rather than refused

    def __init__(self, meta_or_specs, tokenizer, cfg: DataConfig, is_train: bool = True, seed: int = 0, strict: bool = False):
        if isinstance(meta_or_specs, (str, os.PathLike)):
            meta_or_specs = read_meta(meta_or_specs)
        if not cfg.resolved:
            raise ValueError("resolve the DataConfig against the checkpoint first (DataConfig.resolve)")
        self.specs: list[DatasetSpec] = list(meta_or_specs)
        self.tokenizer, self.cfg = tokenizer, cfg
        self.template = get_template(cfg.conv_style, cfg.system_message)
        self.is_train, self.seed, self.strict = is_train, seed, strict
        self.epoch = 0
        self.indexes = [Annotations.of(s) for s in self.specs]
        require_samples(self.specs, [len(ix) for ix in self.indexes])
        self.sizes = [s.num_samples(len(ix)) for s, ix in zip(self.specs, self.indexes)]
        self.starts = np.cumsum([0] + self.sizes)
        self._lengths: list[int] | None = None
        self._kinds: list[str] | None = None
        self._tiles: list[int] | None = None
        if tokenizer is not None:  # fail early if the InternVL tokens or the template's special tokens are missing
            tokenizer_info(tokenizer).check_template(tokenizer, self.template)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def notices(self) -> list[str]:
        """Things about the meta JSON worth one line in the run's log (a root found in two places)."""
        return [s.notice for s in self.specs if s.notice]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random choices (frames, JPEG qualities) samples get."""
        self.epoch = int(epoch)

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset number, usable-line number) of global sample ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, self.specs[k].line_of(i - int(self.starts[k]), len(self.indexes[k]))

    def where(self, i: int) -> str:
        k, line = self.locate(i)
        return self.indexes[k].where(line)

    def sample_id(self, i: int) -> str:
        k, line = self.locate(i)
        return f"{self.specs[k].name}:{self.indexes[k].line_number(line)}"

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i])

    # ---- building one sample -------------------------------------------------------------------------------

    def prepare(self, i: int) -> Prepared:
        """Parse, load and tokenize sample ``i`` (fitting it into ``max_seq_length``); raises DataError if unusable."""
        k, line = self.locate(i)
        spec, index = self.specs[k], self.indexes[k]
        where = index.where(line)
        sample_id = f"{spec.name}:{index.line_number(line)}"
        parsed = self.parse(index.read(line), where)
        item, kind = parsed.item, parsed.kind
        rng = self.rng(i)
        augment = self.is_train and spec.data_augment
        max_patch = spec.max_dynamic_patch or self.cfg.max_dynamic_patch
        builder = {"text": self._text, "image": self._image, "multi_image": self._multi_image, "video": self._video}[kind]
        tiles, encoded, notes = builder(item, parsed.messages, parsed.system, spec, max_patch, rng, where)
        return Prepared(sample_id, where, kind, encoded, tiles, augment, notes)

    def parse(self, item: dict, where: str) -> Parsed:
        """Every check of a line that needs no file: its kind, its turns and the rules of ``rules.py``.

        ``data check`` calls this too, so what it reports as an error is exactly what training refuses.
        """
        kind = sample_kind(item, where)
        system, messages, warnings = self.messages(item, where)
        human = [text for role, text in messages if role == HUMAN]
        gpt = [a for role, text in messages if role == GPT for a in (text if isinstance(text, (tuple, list)) else (text,))]
        check_rules(kind, item, human, gpt, where)
        return Parsed(item, kind, system, messages, warnings)

    def messages(self, item: dict, where: str) -> tuple[str | None, list[tuple[str, object]], list[str]]:
        """The system message (None: the template's), the turns of a line, and warnings about them."""
        return conversation_messages(item, self.template, where)

    def _encode(self, messages, system, counts: list[int], where: str, text_only: bool = False) -> Encoded:
        return build_conversation_ids(messages, self.tokenizer, self.template, counts, system, text_only, where)

    def _finish(self, enc: Encoded, where: str, notes: list[str]) -> Encoded:
        """Check the label mask and cut the text tail when needed (never inside image tokens)."""
        limit = self.cfg.max_seq_length
        if enc.mismatch:
            raise DataError("an assistant header tokenizes differently inside the turn, so no label mask can be built "
                            "(the reference masks the whole sample)", where,
                            "remove leading whitespace/newlines from the gpt answers")
        if len(enc.input_ids) > limit:
            if enc.image_end > limit:
                raise DataError(f"the image tokens alone reach past --max_seq_length {limit} even with the fewest tiles",
                                where, "raise --max_seq_length, lower the tile/frame count, or split the sample")
            notes.append(truncation_note(len(enc.input_ids), limit))
            enc = enc.truncated(limit)
        if enc.num_supervised == 0:
            raise DataError(f"no answer token is left within --max_seq_length {limit}", where,
                            "shorten the prompt, raise --max_seq_length, or split the conversation")
        return enc

    def _text(self, item, messages, system, spec, max_patch, rng, where):
        notes: list[str] = []
        enc = self._encode(messages, system, [], where, text_only=True)
        white = Image.new("RGB", (224, 224), (255, 255, 255))
        tiles = dynamic_preprocess(white, self.cfg.min_dynamic_patch, 1, self.cfg.force_image_size, self.cfg.use_thumbnail)
        return [tiles], self._finish(enc, where, notes), notes

    def _tile(self, image: Image.Image, max_num: int) -> list[Image.Image]:
        if not self.cfg.dynamic_image_size:
            return [image]
        return dynamic_preprocess(image, self.cfg.min_dynamic_patch, max_num, self.cfg.force_image_size, self.cfg.use_thumbnail)

    def _fit_images(self, images, messages, system, budgets: list[int], where: str, notes: list[str]):
        """Tile and tokenize; if too long, use fewer tiles, then cut the text tail, never image tokens.

        The largest tile budget whose sample fits whole wins; when none does, the largest budget that keeps all image
        tokens inside ``max_seq_length`` is used and the text after the last image is cut (as the reference cuts).
        """
        cfg, per_tile, limit = self.cfg, self.cfg.num_image_token, self.cfg.max_seq_length
        tiles = [self._tile(im, b) for im, b in zip(images, budgets)]
        enc = self._encode(messages, system, [per_tile * len(t) for t in tiles], where)
        if len(enc.input_ids) > limit and cfg.dynamic_image_size:
            n, old = len(images), sum(len(t) for t in tiles)
            keeps_images = None  # the largest budget whose image tokens end inside the limit
            for total in range(sum(budgets) - 1, 0, -1):
                smaller = [max(1, total // n)] * n if n > 1 else [total]
                if any(b < cfg.min_dynamic_patch for b in smaller):
                    break
                counts = [num_tiles(*im.size, cfg.min_dynamic_patch, b, cfg.use_thumbnail, cfg.force_image_size)
                          for im, b in zip(images, smaller)]
                saved = per_tile * (old - sum(counts))
                if len(enc.input_ids) - saved <= limit:
                    keeps_images = smaller
                    break
                if keeps_images is None and enc.image_end - saved <= limit:
                    keeps_images = smaller
            if keeps_images is not None:
                tiles = [self._tile(im, b) for im, b in zip(images, keeps_images)]
                enc = self._encode(messages, system, [per_tile * len(t) for t in tiles], where)
                notes.append(f"re-tiled from {old} to {sum(len(t) for t in tiles)} tiles to fit --max_seq_length {limit}")
        return tiles, self._finish(enc, where, notes)

    def _image(self, item, messages, system, spec, max_patch, rng, where):
        notes: list[str] = []
        h = first_human(messages)
        if IMAGE_PLACEHOLDER not in messages[h][1]:
            messages[h] = (messages[h][0], IMAGE_PLACEHOLDER + "\n" + messages[h][1])
        image = load_image(media_path(spec, item["image"], self.cfg.allow_outside_root, where), where)
        tiles, enc = self._fit_images([image], messages, system, [max_patch], where, notes)
        return tiles, enc, notes

    def _multi_image(self, item, messages, system, spec, max_patch, rng, where):
        notes: list[str] = []
        images = [load_image(media_path(spec, p, self.cfg.allow_outside_root, where), where) for p in item["image"]]
        budget = max(1, max_patch // len(images))
        tiles, enc = self._fit_images(images, messages, system, [budget] * len(images), where, notes)
        return tiles, enc, notes

    def _video(self, item, messages, system, spec, max_patch, rng, where):
        notes: list[str] = []
        cfg = self.cfg
        h = first_human(messages)
        if VIDEO_PLACEHOLDER not in messages[h][1]:
            messages[h] = (messages[h][0], VIDEO_PLACEHOLDER + "\n" + messages[h][1])
        path = media_path(spec, item["video"], cfg.allow_outside_root, where, "video")
        clip = item.get("clip")  # its form is checked by parse (rules.py)
        if self.is_train:
            wanted, sample = int(rng.integers(cfg.min_num_frame, cfg.max_num_frame + 1)), "rand"
        else:
            wanted, sample = cfg.max_num_frame, "middle"
        frames, _ = load_video_frames(path, wanted, sample, rng, tuple(clip) if clip else None, where)
        while True:
            expanded = list(messages)
            expanded[h] = (expanded[h][0], expand_video_placeholder(messages[h][1], len(frames)))
            enc = self._encode(expanded, system, [cfg.num_image_token] * len(frames), where)
            excess = len(enc.input_ids) - cfg.max_seq_length
            if excess <= 0 or len(frames) == 1:
                break
            # Drop evenly spread frames; each costs its image tokens plus a short "Frame-i: " line.
            keep = max(1, len(frames) - -(-excess // (cfg.num_image_token + 8)))
            picks = np.linspace(0, len(frames) - 1, keep).round().astype(int)
            notes.append(f"kept {keep} of {len(frames)} frames to fit --max_seq_length {cfg.max_seq_length}")
            frames = [frames[p] for p in picks]
        return [[f] for f in frames], self._finish(enc, where, notes), notes

    def build(self, i: int) -> dict:
        """Sample ``i`` as the training loop's dict, or DataError if it cannot be used. A sample cut to
        ``--max_seq_length`` carries its :class:`Truncation` under ``"truncated"``."""
        p = self.prepare(i)
        cfg = self.cfg
        transform = ImageTransform(p.augment, cfg.force_image_size, cfg.pad2square, cfg.normalize_type)
        rng = np.random.default_rng([self.seed, self.epoch, i, 1])  # pixels get their own stream
        pixel_values = tiles_to_tensor([t for group in p.tiles for t in group], transform, rng)
        flag = 0 if p.kind == "text" else 1
        sample = {
            **self._token_fields(p.encoded),
            "pixel_values": pixel_values,
            "image_flags": torch.full((len(pixel_values),), flag, dtype=torch.long),
            "sample_id": p.sample_id,
        }
        if p.encoded.cut_from is not None:  # counted by the trainer (train/skips.py), as data check warns of it
            sample["truncated"] = Truncation(p.sample_id, p.where, p.encoded.cut_from, cfg.max_seq_length)
        return sample

    def _token_fields(self, encoded: Encoded) -> dict:
        return {"input_ids": encoded.input_ids, "labels": encoded.labels}

    def __getitem__(self, i: int) -> dict:
        """Sample ``i``. Unless ``strict``, a broken one is replaced by the next usable sample (the reference draws a
        random one), and its :class:`SkipRecord` rides along under ``"skipped"``: the trainer counts it against
        ``--max_skipped_samples`` and writes it down. The replacement depends on the data only, so a resumed run
        makes the same choice.

        Raises:
            DataError: ``strict`` and the sample is broken, or :data:`MAX_TRIES` samples in a row are.
        """
        try:
            return self.build(i)
        except DataError as exc:
            if self.strict:
                raise
            record = SkipRecord.of(exc, self.sample_id(i), self.where(i))
        for attempt in range(1, min(MAX_TRIES, len(self))):
            try:
                sample = self.build((i + attempt) % len(self))
            except DataError:
                continue  # recorded when its own turn comes
            return {**sample, "skipped": [record]}
        raise DataError(f"{min(MAX_TRIES, len(self))} samples in a row are unusable, from {record.sample_id} on (the "
                        f"first: {record})", record.where, "run `internvl-tune data check` on the meta JSON")

    # ---- cheap per-sample estimates for length grouping and packing -----------------------------------------

    @property
    def lengths(self) -> list[int]:
        """Estimated tokens per sample (text tokens + image tokens), computed on first use without decoding images."""
        if self._lengths is None:
            self._estimate()
        return self._lengths

    @property
    def kinds(self) -> list[str]:
        """Sample kind of each sample (``text``, ``image``, ``multi_image``, ``video``; ``invalid`` if unparsable)."""
        if self._kinds is None:
            self._estimate()
        return self._kinds

    @property
    def tiles(self) -> list[int]:
        """Estimated tiles per sample (1 for pure text), for packing's tile budget."""
        if self._tiles is None:
            self._estimate()
        return self._tiles

    def _estimate(self) -> None:
        lengths, kinds, tiles = [], [], []
        for spec, index, size in zip(self.specs, self.indexes, self.sizes):
            n_lines = len(index)
            if size == 0:
                continue
            used = min(size, n_lines)  # a fraction keeps a prefix; repeats reuse the same lines
            est = estimate_lines(index, range(used), self.tokenizer, self.template, self.cfg,
                                 spec.max_dynamic_patch or self.cfg.max_dynamic_patch, self.line_texts,
                                 self.rows_per_sample)
            for s in range(size):
                length, kind, n_tiles = est[spec.line_of(s, n_lines)]
                lengths.append(length)
                kinds.append(kind)
                tiles.append(n_tiles)
        self._lengths, self._kinds, self._tiles = lengths, kinds, tiles
