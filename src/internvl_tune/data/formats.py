"""Line formats of other fine-tuning tools, converted to the InternVL line every reader here takes.

The InternVL line (the reference's chat data format) is ``{"image": path | [paths], "video": path, "conversations":
[{"from": "system" | "human" | "gpt", "value": text}]}``. Two other formats are common among users of ms-swift and
LLaMA-Factory; each is one entry of :data:`FORMATS`:

- ``messages`` (ms-swift, the OpenAI chat layout)::

      {"messages": [{"role": "system" | "user" | "assistant", "content": "...<image>..."}],
       "images": ["a.jpg"], "videos": ["clip.mp4"]}

  ``content`` may also be a list of parts (``{"type": "text", "text": ...}``, ``{"type": "image", "image": path}``,
  ``{"type": "image_url", "image_url": {"url": path}}``, ``{"type": "video", "video": path}``): each media part
  becomes a ``<image>`` / ``<video>`` placeholder where it stands and its path joins ``images`` / ``videos``.
- ``sharegpt`` (LLaMA-Factory): ``{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}],
  "system": "...", "images": [...], "videos": [...]}``, with the column and tag names of LLaMA-Factory's
  ``dataset_info.json`` (``columns``: messages, system, images, videos; ``tags``: role_tag, content_tag, user_tag,
  assistant_tag, system_tag) configurable in the meta entry. ``role`` / ``content`` turns with ``user`` /
  ``assistant`` roles are recognised without configuration.

A file's format is detected from its first line (:func:`detect`) unless its meta entry says ``"format"``; each line
is then converted by that entry, and a line that does not fit is a DataError at its ``file:line``. The converted
line is what an InternVL line with the same content is, so both train alike: one image becomes ``"image": path``
(several: a list), one video ``"video": path``, the system message the first turn, placeholders untouched (the
shared rules in ``data/rules.py`` check their counts). An image may also be embedded (``{"bytes": ..., "path":
...}``, the Hugging Face ``Image`` feature of Parquet / Arrow files): it becomes an :class:`EmbeddedImage`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

from internvl_tune.errors import DataError

SYSTEM, HUMAN, GPT = "system", "human", "gpt"


class EmbeddedImage(str):
    """Image bytes stored in the annotation file itself (a Parquet / Arrow row), named by the file they came from.

    It is a ``str`` (the name, or ``<embedded image, N bytes>``), so every rule that counts, names or lists images
    takes it like a path; ``dataset.media_path`` passes it through and ``images.load_image`` decodes its bytes.
    """

    data: bytes

    def __new__(cls, data: bytes, name: str = ""):
        self = super().__new__(cls, name or f"<embedded image, {len(data)} bytes>")
        self.data = bytes(data)
        return self

    def __reduce__(self):  # (pickled into data-loader workers with the line)
        return EmbeddedImage, (self.data, str(self))

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)


@dataclass(frozen=True)
class FormatOptions:
    """A meta entry's naming of the columns and role tags (LLaMA-Factory's ``dataset_info.json`` keys)."""

    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)

    def column(self, name: str, default: str) -> str:
        return self.columns.get(name, default)

    def tag(self, name: str, default: str) -> str:
        return self.tags.get(name, default)


COLUMN_KEYS = ("messages", "system", "images", "videos")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")


@dataclass(frozen=True)
class Format:
    """One line format: how to recognise a first line, how to convert any line, and what to tell users."""

    name: str
    description: str
    detects: Callable[[dict], bool]
    convert: Callable[[dict, str | None, FormatOptions], dict]


def _media(value, where: str | None, what: str) -> list:
    """A media column (``images`` / ``videos``): a path, embedded bytes, or a list of them -> a list."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if isinstance(v, dict) and ("bytes" in v or "path" in v):  # the Hugging Face Image feature
            if v.get("bytes"):
                out.append(EmbeddedImage(bytes(v["bytes"]), v.get("path") or ""))
                continue
            v = v.get("path")
        if not isinstance(v, str) or not v:
            raise DataError(f"`{what}` must hold paths (or embedded images {{\"bytes\": ..., \"path\": ...}}), got "
                            f"{type(v).__name__}", where, f'write "{what}": ["a.jpg"]')
        out.append(v)
    return out


def _internvl_line(turns: list[dict], images: list, videos: list, rest: dict, where: str | None) -> dict:
    """The InternVL line of converted ``turns`` and media (``rest``: the line's other keys, kept)."""
    line = dict(rest)
    if images:
        line["image"] = images[0] if len(images) == 1 else images
    if len(videos) > 1:
        raise DataError(f"{len(videos)} videos in one line; InternVL samples hold one video", where,
                        "split the line into one line per video")
    if videos:
        line["video"] = videos[0]
    line["conversations"] = turns
    return line


def _text(value, where: str | None, images: list, videos: list) -> str:
    """A turn's content: a string, or OpenAI-style parts whose media become placeholders (paths appended)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise DataError(f"a turn's content must be text or a list of parts, got {type(value).__name__}", where,
                        'write "content": "<image>What is this?"')
    pieces = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(str(part.get("text", "")))
        elif kind in ("image", "image_url"):
            url = part.get("image") if kind == "image" else (part.get("image_url") or {}).get("url")
            if url:
                images.extend(_media(url, where, "image"))
            pieces.append("<image>")
        elif kind == "video":
            if part.get("video"):
                videos.extend(_media(part["video"], where, "video"))
            pieces.append("<video>")
        else:
            raise DataError(f"a content part of type {kind!r} is not supported", where,
                            "use parts of type text, image, image_url or video")
    return "".join(pieces)


def _convert_messages(item: dict, where: str | None, options: FormatOptions) -> dict:
    key = options.column("messages", "messages")
    messages = item.get(key)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"`{key}` (the turns) is missing or empty", where,
                        f'write "{key}": [{{"role": "user", "content": "..."}}, {{"role": "assistant", ...}}], '
                        'or set "format" in the meta entry')
    images = _media(item.get(options.column("images", "images")), where, "images")
    videos = _media(item.get(options.column("videos", "videos")), where, "videos")
    roles = {options.tag("system_tag", "system"): SYSTEM, options.tag("user_tag", "user"): HUMAN,
             options.tag("assistant_tag", "assistant"): GPT}
    role_key, content_key = options.tag("role_tag", "role"), options.tag("content_tag", "content")
    turns = [_turn(m, roles, role_key, content_key, where, images, videos) for m in messages]
    system = item.get(options.column("system", "system"))
    if system:
        turns.insert(0, {"from": SYSTEM, "value": str(system)})
    rest = {k: v for k, v in item.items() if k not in {key, options.column("images", "images"),
                                                      options.column("videos", "videos"),
                                                      options.column("system", "system")}}
    return _internvl_line(turns, images, videos, rest, where)


def _turn(turn, roles: dict, role_key: str, content_key: str, where: str | None, images: list, videos: list) -> dict:
    if not isinstance(turn, dict) or role_key not in turn:
        raise DataError(f"a turn without `{role_key}`: {str(turn)[:80]}", where,
                        f'each turn is {{"{role_key}": ..., "{content_key}": ...}}')
    role = roles.get(turn[role_key])
    if role is None:
        raise DataError(f"role {turn[role_key]!r} is not supported (roles: {', '.join(map(repr, roles))})", where,
                        "tool and function turns have no place in InternVL's templates: drop them, or name the "
                        "roles with `tags` in the meta entry")
    return {"from": role, "value": _text(turn.get(content_key), where, images, videos)}


def _sharegpt_options(item: dict, options: FormatOptions) -> FormatOptions:
    """LLaMA-Factory's defaults, and its OpenAI-style tags when the turns use role / content."""
    turns = item.get(options.column("messages", "conversations"))
    first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
    openai = "role" in first and "from" not in first
    tags = {"role_tag": "role" if openai else "from", "content_tag": "content" if openai else "value",
            "user_tag": "user" if openai else "human", "assistant_tag": "assistant" if openai else "gpt",
            "system_tag": "system", **options.tags}
    return FormatOptions({"messages": "conversations", **options.columns}, tags)


def _convert_sharegpt(item: dict, where: str | None, options: FormatOptions) -> dict:
    return _convert_messages(item, where, _sharegpt_options(item, options))


def _convert_internvl(item: dict, where: str | None, options: FormatOptions) -> dict:
    return item


def _detects_messages(item: dict) -> bool:
    return isinstance(item.get("messages"), list)


def _detects_sharegpt(item: dict) -> bool:
    turns = item.get("conversations")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        return False
    return "role" in turns[0] or "images" in item or "videos" in item


FORMATS = {f.name: f for f in (
    Format("messages", "ms-swift / OpenAI: messages with role and content, images and videos lists",
           _detects_messages, _convert_messages),
    Format("sharegpt", "LLaMA-Factory ShareGPT: conversations with from/value (or role/content), images and videos "
                       "lists", _detects_sharegpt, _convert_sharegpt),
    Format("internvl", "InternVL: image / video and conversations with from/value", lambda item: True,
           _convert_internvl),
)}


def detect(item: dict) -> str:
    """The format of a file, from its first line: the first entry of :data:`FORMATS` that recognises it."""
    return next(name for name, f in FORMATS.items() if f.detects(item))


def format_options(entry: dict, where: str | None) -> tuple[str | None, FormatOptions]:
    """``(format or None to detect, options)`` from a meta entry's ``format``, ``columns`` and ``tags`` keys."""
    name = entry.get("format")
    if name is not None and name not in FORMATS:
        raise DataError(f"unknown format {name!r}", where, f"use one of {', '.join(FORMATS)} (or leave it out to "
                                                            "detect it from the first line)")
    for key, allowed in (("columns", COLUMN_KEYS), ("tags", TAG_KEYS)):
        value = entry.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise DataError(f"`{key}` must map names to strings", where, f'e.g. "{key}": {{"{allowed[0]}": "..."}}')
        unknown = set(value) - set(allowed)
        if unknown:
            raise DataError(f"`{key}` has unknown key(s) {sorted(unknown)}", where, f"the keys are {', '.join(allowed)}")
    return name, FormatOptions(dict(entry.get("columns", {})), dict(entry.get("tags", {})))


def convert(item: dict, name: str, options: FormatOptions, where: str | None) -> dict:
    """``item`` of format ``name`` as an InternVL line."""
    return FORMATS[name].convert(item, where, options)
