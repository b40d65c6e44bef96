"""Validate a meta JSON and everything it names before training (the engine of ``internvl-tune data check``).

Every problem is reported as ``file:line: what is wrong — how to fix it``. Errors make a sample unusable (it would be
skipped in training, or break it); warnings are allowed but worth knowing (truncated text, fewer tiles, a leading gpt
turn the reference drops, a declared ``length`` that differs from the file).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from PIL import Image

from internvl_tune.data.annotations import Annotations
from internvl_tune.data.config import DataConfig
from internvl_tune.data.dataset import SupervisedDataset, media_path
from internvl_tune.data.images import image_source, load_image, num_tiles
from internvl_tune.data.meta import DatasetSpec, read_meta, require_samples
from internvl_tune.data.preprocess import tokenizer_info
from internvl_tune.data.templates import GPT, get_template, is_thinking_answer
from internvl_tune.data.video import load_video_frames
from internvl_tune.errors import DataError, problem_line

_EXIF_ORIENTATION = 0x0112


@dataclass
class Problem:
    where: str | None
    message: str
    fix: str | None
    error: bool = True

    def __str__(self) -> str:
        return problem_line(self.message, self.where, self.fix)


@dataclass
class CheckReport:
    """What ``data check`` found.

    Attributes:
        problems: errors and warnings, in file order.
        samples: samples per (dataset, kind) per epoch (``repeat_time`` applied).
        lines: usable JSONL lines (or table rows) per dataset.
        formats: each dataset's line format (``data/formats.py``), and whether it was detected.
        token_lengths: tokens of each checked line (only with a tokenizer), with its repeat count.
        tiles_per_image: tiles of each checked image (thumbnail included); frames count one tile each.
        tokens_per_epoch: estimated tokens one epoch feeds the model (only with a tokenizer).
        answers, thinking_answers: gpt answers of the checked lines (a pair: both), and those that reason inside
            ``<think>...</think>`` first (InternVL3.5's thinking mode).
        shown: a few rendered samples (``--show``).
        notices: facts about the meta JSON worth a line (a root found in two places: which one is used).
    """

    problems: list[Problem] = field(default_factory=list)
    samples: Counter = field(default_factory=Counter)
    lines: dict[str, int] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)
    token_lengths: list[tuple[int, int]] = field(default_factory=list)
    supervised_tokens: int = 0
    tiles_per_image: Counter = field(default_factory=Counter)
    tokens_per_epoch: int = 0
    answers: int = 0
    thinking_answers: int = 0
    shown: list = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.error]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.error]


def check_meta(
    meta_path: str,
    cfg: DataConfig,
    tokenizer=None,
    progress=None,
    show: int = 0,
    reader: type[SupervisedDataset] = SupervisedDataset,
) -> CheckReport:
    """Check every dataset, line, image and video of ``meta_path``.

    The rules are the training dataset's own (``SupervisedDataset.parse`` and ``prepare``): a line reported as an
    error here is one training refuses, and one that passes here trains.

    Args:
        meta_path: the meta JSON.
        cfg: the data settings training will use (template, tiles, lengths).
        tokenizer: when given, every sample is also tokenized: lengths, truncation, supervised tokens.
        progress: optional callable(advance: int, total: int | None) for a progress bar.
        show: render this many samples into ``report.shown`` (needs a tokenizer).
        reader: the dataset class that reads the lines (the training objective's: conversations, preference pairs
            ``data/preference.py``, prompts ``data/prompts.py``); its ``parse`` and ``prepare`` are the rules.
    """
    report = CheckReport()
    try:
        specs = read_meta(meta_path)
        template = get_template(cfg.conv_style)
        if tokenizer is not None:  # a template/tokenizer mismatch is one problem, not one per line
            tokenizer_info(tokenizer).check_template(tokenizer, template)
    except DataError as exc:
        report.problems.append(Problem(exc.where, exc.message, exc.fix))
        return report
    report.notices = [s.notice for s in specs if s.notice]
    indexes: list[Annotations | None] = []
    for spec in specs:
        try:
            indexes.append(Annotations.of(spec))
        except DataError as exc:
            report.problems.append(Problem(exc.where, exc.message, exc.fix))
            indexes.append(None)
    usable = [(s, ix) for s, ix in zip(specs, indexes) if ix is not None]
    try:
        require_samples([s for s, _ in usable], [len(ix) for _, ix in usable])
    except DataError as exc:
        report.problems.append(Problem(exc.where, exc.message, exc.fix))
        usable = []
    total = sum(min(len(ix), s.num_samples(len(ix))) for s, ix in usable)
    if progress:
        progress(0, total)
    if not usable:
        return report
    dataset = reader([s for s, _ in usable], tokenizer, cfg, is_train=False, strict=True)
    for k, (spec, index) in enumerate(usable):
        _check_dataset(report, spec, index, cfg, dataset, k, progress, show)
    return report


def _check_dataset(report, spec: DatasetSpec, index: Annotations, cfg, dataset, k: int, progress, show: int):
    n_lines = len(index)
    report.lines[spec.name] = n_lines
    report.formats[spec.name] = index.format + (" (detected)" if index.detected else "")
    if spec.length is not None and spec.length != n_lines:
        report.problems.append(Problem(spec.where, f"dataset {spec.name!r} declares length {spec.length} but "
                                       f"{spec.annotation} has {n_lines} lines (blank lines not counted)",
                                       "update `length`", error=False))
    size = spec.num_samples(n_lines)
    if size == 0:
        report.problems.append(Problem(spec.where, f"dataset {spec.name!r} contributes no samples "
                                       f"(repeat_time {spec.repeat_time}, {n_lines} lines)", "raise repeat_time or add lines",
                                       error=False))
    checked = min(n_lines, size)  # a fraction uses only a prefix of the file
    repeats = [0] * checked
    for s in range(size):
        repeats[spec.line_of(s, n_lines)] += 1
    start = int(dataset.starts[k])
    for line in range(checked):
        where = index.where(line)
        problems = _check_line(report, spec, index, line, where, cfg, dataset, repeats[line])
        if not problems and dataset.tokenizer is not None:
            problems = _check_tokens(report, dataset, start + line, repeats[line], show)
        report.problems.extend(problems)
        if progress:
            progress(1, None)


def _check_line(report, spec, index, line, where, cfg, dataset, repeats: int) -> list[Problem]:
    """The training dataset's rules for one line (``SupervisedDataset.parse``), then its files; records kind counts
    and tiles."""
    try:
        parsed = dataset.parse(index.read(line), where)
    except DataError as exc:
        return [Problem(exc.where, exc.message, exc.fix)]
    item, kind = parsed.item, parsed.kind
    report.samples[(spec.name, kind)] += repeats
    answers = [a for role, text in parsed.messages if role == GPT  # a preference line: both answers
               for a in (text if isinstance(text, (tuple, list)) else (text,))]
    report.answers += len(answers)
    report.thinking_answers += sum(map(is_thinking_answer, answers))
    problems = [Problem(where, w, None, error=False) for w in parsed.warnings]
    max_patch = spec.max_dynamic_patch or cfg.max_dynamic_patch
    try:
        if kind in ("image", "multi_image"):
            paths = [item["image"]] if kind == "image" else item["image"]
            budget = max_patch if kind == "image" else max(1, max_patch // len(paths))
            for rel in paths:
                path = media_path(spec, rel, cfg.allow_outside_root, where)
                image = load_image(path, where)  # decodes every pixel, so truncated files show up here
                tiles = num_tiles(*image.size, cfg.min_dynamic_patch, budget, cfg.use_thumbnail, cfg.force_image_size) \
                    if cfg.dynamic_image_size else 1
                report.tiles_per_image[tiles] += 1
                problems += [Problem(where, msg, fix, error=False) for msg, fix in stored_image_warnings(path)]
                w, h = item.get("width"), item.get("height")
                if kind == "image" and not all(isinstance(v, int) or v is None for v in (w, h)):
                    problems.append(Problem(where, f"width/height must be integers, got {w!r}/{h!r}",
                                            "write the pixel sizes as JSON integers or drop them", error=False))
                if kind == "image" and isinstance(w, int) and isinstance(h, int) and (w, h) != image.size:
                    problems.append(Problem(where, f"width/height say {w}x{h} but the image is {image.size[0]}x"
                                            f"{image.size[1]}", "fix or drop width/height (used for length estimates)",
                                            error=False))
        elif kind == "video":
            path = media_path(spec, item["video"], cfg.allow_outside_root, where, "video")
            frames, _ = load_video_frames(path, cfg.max_num_frame, "middle", where=where)
            report.tiles_per_image[1] += len(frames)
    except DataError as exc:
        problems.append(Problem(exc.where, exc.message, exc.fix))
    return problems


def stored_image_warnings(path: str) -> list[tuple[str, str]]:
    """(message, fix) for images that decode but not as the user probably sees them.

    Images are used exactly as the reference reads them (``Image.open(path).convert("RGB")``), so these are warnings:
    a 16-bit grayscale image is clipped at 255 by that conversion (mostly white), and an EXIF orientation tag is not
    applied (the model sees the pixels as stored, which viewers show rotated).
    """
    out = []
    with Image.open(image_source(path)) as im:
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F") and im.getextrema()[1] > 255:
            out.append((f"{im.mode} image with values up to {im.getextrema()[1]:g}: the RGB conversion clips them at "
                        "255, so the model sees a mostly white image", "convert it to 8-bit (scale by 1/256)"))
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation not in (1, None):
            out.append((f"EXIF orientation {orientation} is not applied: the model sees the image as stored, which "
                        "viewers show rotated/flipped", "rotate the pixels (PIL.ImageOps.exif_transpose) and save "
                        "without the tag, if the text describes the upright view"))
    return out


def _check_tokens(report, dataset: SupervisedDataset, index: int, repeats: int, show: int) -> list[Problem]:
    try:
        prepared = dataset.prepare(index)
    except DataError as exc:
        return [Problem(exc.where, exc.message, exc.fix)]
    for row in getattr(prepared.encoded, "rows", (prepared.encoded,)):  # a preference pair has two token rows
        report.token_lengths.append((len(row.input_ids), repeats))
        report.tokens_per_epoch += len(row.input_ids) * repeats
        report.supervised_tokens += row.num_supervised * repeats
    if len(report.shown) < show and prepared.kind not in {p.kind for p in report.shown}:  # one of each kind
        report.shown.append(prepared)
    return [Problem(prepared.where, note, "raise --max_seq_length or shorten the sample", error=False)
            for note in prepared.notes]


def length_histogram(lengths: list[tuple[int, int]], max_len: int) -> list[tuple[str, int]]:
    """Counts of samples per power-of-two token bucket up to ``max_len``."""
    edges = [0]
    while edges[-1] < max_len:
        edges.append(min(max_len, max(256, edges[-1] * 2)))
    counts = defaultdict(int)
    for n, reps in lengths:
        for lo, hi in zip(edges, edges[1:]):
            if n <= hi:
                counts[(lo, hi)] += reps
                break
    return [(f"{lo + 1}-{hi}", counts[(lo, hi)]) for lo, hi in zip(edges, edges[1:])]
