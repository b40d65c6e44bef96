"""Cheap per-sample token-length estimates for length grouping and packing (no image is opened).

The reference estimates a sample as the token count of its joined messages plus ``256 x (max_dynamic_patch +
use_thumbnail)``. We keep that rule's spirit and sharpen it where the line tells more: no image tokens for pure text,
exact tiles when ``width``/``height`` (``width_list``/``height_list``) are given, the template's fixed tokens, one
tile per frame for video, and a cap at ``max_seq_length`` (samples are fitted to it). A per-line ``length`` wins.
"""

from __future__ import annotations

from internvl_tune.data.images import num_tiles
from internvl_tune.data.meta import sample_kind
from internvl_tune.data.preprocess import tokenizer_info
from internvl_tune.data.templates import GPT, HUMAN, Template
from internvl_tune.errors import DataError

_CHUNK = 2048
_FRAME_LINE_TOKENS = 8  # "Frame-12: " and the newline, generously


def _template_overhead(tokenizer, template: Template) -> tuple[int, int]:
    """(tokens of the system block + special prefix/suffix, tokens a turn adds around its message)."""
    info = tokenizer_info(tokenizer)
    turns = template.turns([(HUMAN, "x"), (GPT, "x")])
    fixed = len(info.prefix) + len(info.suffix)
    per_turn = 0
    for turn in turns:
        n = len(info.encode(tokenizer, turn.text))
        if turn.role in (HUMAN, GPT):
            per_turn = max(per_turn, n - 1)
        else:
            fixed += n
    return fixed, per_turn


def _image_tiles(item: dict, kind: str, cfg, max_patch: int) -> int:
    """Tiles of all images of a line: exact from the recorded sizes, else the budget's upper bound."""
    def tiles(w, h, budget):
        if not cfg.dynamic_image_size:
            return 1
        if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
            return num_tiles(w, h, cfg.min_dynamic_patch, budget, cfg.use_thumbnail, cfg.force_image_size)
        return budget + (1 if cfg.use_thumbnail and budget > 1 else 0)

    if kind == "image":
        return tiles(item.get("width"), item.get("height"), max_patch)
    n = len(item["image"])
    budget = max(1, max_patch // n)
    widths, heights = item.get("width_list"), item.get("height_list")
    if not (isinstance(widths, list) and isinstance(heights, list) and len(widths) == len(heights) == n):
        widths = heights = [None] * n
    return sum(tiles(w, h, budget) for w, h in zip(widths, heights))


def conversation_texts(item: dict) -> list[str]:
    """The message texts of a supervised line (a DataError without ``conversations``)."""
    turns = item.get("conversations")
    if not isinstance(turns, list):
        raise DataError("no conversations")
    return [t.get("value", "") for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]


def estimate_lines(index, lines, tokenizer, template: Template, cfg, max_patch: int, texts=conversation_texts,
                   rows: int = 1) -> dict[int, tuple[int, str, int]]:
    """``{line: (estimated tokens, kind, tiles)}`` for the given usable-line numbers of a JsonlIndex.

    ``texts(item)`` gives the messages of a line; ``rows`` is the number of token rows a line becomes (each repeats
    the template's fixed tokens and the image tokens; the tiles are counted once).
    """
    fixed, per_turn = _template_overhead(tokenizer, template)
    out: dict[int, tuple[int, str, int]] = {}
    pending: list[tuple[int, str, int, int, str]] = []  # (line, kind, tiles, non-text tokens, text)

    def flush():
        if not pending:
            return
        ids = tokenizer([p[4] for p in pending], add_special_tokens=False, verbose=False).input_ids  # (long is fine)
        for (line, kind, n_tiles, extra, _), toks in zip(pending, ids):
            out[line] = (min(rows * cfg.max_seq_length, len(toks) + extra), kind, n_tiles)
        pending.clear()

    for line in lines:
        try:
            item = index.read(line)
            kind = sample_kind(item)
            values = texts(item)
        except DataError:
            out[line] = (1, "invalid", 1)
            continue
        if kind == "text":
            n_tiles, image_tokens = 1, 0
        elif kind == "video":
            n_tiles = cfg.max_num_frame
            image_tokens = n_tiles * (cfg.num_image_token + 2 + _FRAME_LINE_TOKENS)
        else:
            n_tiles = _image_tiles(item, kind, cfg, max_patch)
            n_images = 1 if kind == "image" else len(item["image"])
            image_tokens = n_tiles * cfg.num_image_token + 2 * n_images
        if isinstance(item.get("length"), int) and not isinstance(item.get("length"), bool):
            out[line] = (min(rows * cfg.max_seq_length, item["length"]), kind, n_tiles)
            continue
        pending.append((line, kind, n_tiles, rows * (fixed + image_tokens) + per_turn * len(values), "\n".join(values)))
        if len(pending) >= _CHUNK:
            flush()
    flush()
    return out
