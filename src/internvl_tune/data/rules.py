"""The rules of a sample that nothing downstream would enforce: one table that training and ``data check`` both apply.

A line whose ``<image>`` / ``<video>`` placeholders do not match its images would still tokenize (a surplus
placeholder stays in the prompt as literal text), and a malformed ``clip`` would only fail once its video is
decoded: these rules are the guard, and :meth:`~internvl_tune.data.dataset.SupervisedDataset.parse` applies them for
both. Each rule looks at the sample kind, the line and the texts of the human and gpt turns (a preference pair: the
question, then both answers) and returns ``(what is wrong, how to fix it)`` or None. (The kind itself and the turns
are checked before, by ``meta.sample_kind`` and ``preprocess.parse_conversations``.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from internvl_tune.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from internvl_tune.errors import DataError


@dataclass(frozen=True)
class Turns:
    """What the rules look at: the kind, the line, and the texts of the human and of the gpt turns, in order."""

    kind: str
    item: dict
    human: list[str]
    gpt: list[str]

    def count(self, placeholder: str) -> int:
        return sum(t.count(placeholder) for t in self.human)

    def outside_first_human(self, placeholder: str) -> bool:
        return any(placeholder in t for t in self.human[1:])


Problem = tuple[str, str] | None


def _in_answer(t: Turns) -> Problem:
    if any(IMAGE_PLACEHOLDER in a or VIDEO_PLACEHOLDER in a for a in t.gpt):
        return "a gpt answer contains <image> or <video>", "placeholders belong in human turns only"
    return None


def _text_without_media(t: Turns) -> Problem:
    n = t.count(IMAGE_PLACEHOLDER) + t.count(VIDEO_PLACEHOLDER)
    if t.kind == "text" and n:
        return (f"pure-text sample (no `image`/`video` field) contains {n} placeholder(s)",
                "add the `image`/`video` field, or remove the placeholder")
    return None


def _single_image(t: Turns) -> Problem:
    n = t.count(IMAGE_PLACEHOLDER)
    if t.kind == "image" and (n > 1 or t.outside_first_human(IMAGE_PLACEHOLDER)):
        return (f"single-image sample has {n} <image> placeholder(s) (or one outside the first human turn)",
                "use exactly one <image>, in the first human turn (or none: it is then prepended)")
    return None


def _image_list(t: Turns) -> Problem:
    n, listed = t.count(IMAGE_PLACEHOLDER), len(t.item.get("image") or ())
    if t.kind == "multi_image" and n != listed:
        return (f"`image` lists {listed} image(s) but the human turns hold {n} <image> placeholder(s)",
                "put one <image> per listed image, in the same order")
    return None


def _video(t: Turns) -> Problem:
    if t.kind != "video":
        return None
    n = t.count(VIDEO_PLACEHOLDER)
    if n > 1 or t.outside_first_human(VIDEO_PLACEHOLDER):
        return (f"video sample has {n} <video> placeholder(s) (or one outside the first human turn)",
                "use one <video> in the first human turn, or none (it is then prepended)")
    if t.count(IMAGE_PLACEHOLDER):
        return "video sample contains <image>", "remove it: frames are inserted where <video> stands"
    return None


def _video_placeholder_without_video(t: Turns) -> Problem:
    n = t.count(VIDEO_PLACEHOLDER)
    if t.kind in ("image", "multi_image") and n:
        return (f"image sample contains {n} <video> placeholder(s) but no `video`",
                "remove the <video> placeholder (a sample is either images or one video)")
    return None


def _clip(t: Turns) -> Problem:
    clip = t.item.get("clip")
    if t.kind == "video" and clip is not None and not (
            isinstance(clip, list) and len(clip) == 2
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in clip) and 0 <= clip[0] < clip[1]):
        return f"`clip` must be [start_seconds, end_seconds] with start < end, got {clip!r}", 'write "clip": [1.5, 8.0]'
    return None


# Applied in this order; the first problem found is the sample's error.
RULES: tuple[Callable[[Turns], Problem], ...] = (
    _in_answer, _text_without_media, _single_image, _image_list, _video, _video_placeholder_without_video, _clip,
)


def check_rules(kind: str, item: dict, human: list[str], gpt: list[str], where: str | None = None) -> None:
    """Raise a DataError for the first of :data:`RULES` the sample breaks."""
    turns = Turns(kind, item, human, gpt)
    for rule in RULES:
        problem = rule(turns)
        if problem is not None:
            raise DataError(problem[0], where, problem[1])
