"""The meta JSON (which datasets, where) and lazily read JSONL annotation files.

Meta JSON, as the reference defines it::

    {"my-dataset": {"root": "images/", "annotation": "train.jsonl", "data_augment": false,
                    "repeat_time": 1, "length": 1234, "max_dynamic_patch": 6}}

A relative ``root`` / ``annotation`` is looked up from the current directory first (the reference's behaviour) and
then from the meta file's folder, so a meta JSON next to its data works from anywhere.

A JSONL file is opened by scanning it once for line starts (numpy over 16 MiB blocks) and keeping only an int64
offset per non-empty line; a line is parsed when its sample is requested.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from internvl_tune.errors import DataError

META_KEYS = {"root", "annotation", "data_augment", "repeat_time", "length", "max_dynamic_patch"}
_BLOCK = 16 << 20


@dataclass
class DatasetSpec:
    """One entry of the meta JSON.

    Attributes:
        name: the dataset's key in the meta JSON.
        root: folder the ``image`` / ``video`` paths are relative to.
        annotation: the JSONL file.
        data_augment: JPEG re-encode augmentation in training.
        repeat_time: < 1 keeps that fraction of the lines (a prefix); an integer > 1 repeats them.
        length: the line count the user declared (informational; ``data check`` compares it).
        max_dynamic_patch: per-dataset tile budget overriding the command-line value.
        meta_path: the meta JSON this came from (for messages).
    """

    name: str
    root: str
    annotation: str
    data_augment: bool = False
    repeat_time: float = 1
    length: int | None = None
    max_dynamic_patch: int | None = None
    meta_path: str | None = None

    def num_samples(self, num_lines: int) -> int:
        """Samples this dataset contributes per epoch, given its number of usable lines."""
        if self.repeat_time < 1:
            return int(num_lines * self.repeat_time)
        return num_lines * int(self.repeat_time)

    def line_of(self, sample: int, num_lines: int) -> int:
        """Index (into the usable lines) of the ``sample``-th sample: a prefix for < 1, wrap-around for > 1."""
        return sample % num_lines


def _resolve(value: str, base: Path) -> str:
    if os.path.isabs(value) or os.path.exists(value):
        return value
    beside = base / value
    return str(beside) if beside.exists() else value


def read_meta(path: str | os.PathLike) -> list[DatasetSpec]:
    """Parse and validate a meta JSON.

    Raises:
        DataError: for a missing file, bad JSON, unknown or missing keys, or wrong value types, naming the dataset.
    """
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"meta file not found: {path}", fix="pass the path of your meta JSON (--meta_path)") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"the meta JSON is not UTF-8 text (byte {exc.start})", f"{path}:1",
                        "save it as UTF-8 (JSON files must be UTF-8)") from None
    except OSError as exc:  # a directory, no permission, ...
        raise DataError(f"cannot read the meta JSON {path}: {exc.strerror}", fix="pass the path of your meta JSON file") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", f"{path}:{exc.lineno}", "fix the JSON syntax") from None
    if not isinstance(meta, dict) or not meta:
        raise DataError("the meta JSON must be an object mapping dataset names to their settings", f"{path}:1",
                        'write {"name": {"root": "...", "annotation": "....jsonl", "data_augment": false, "repeat_time": 1}}')
    base = Path(path).resolve().parent
    specs = []
    for name, entry in meta.items():
        where = f"{path}:{_line_of_key(text, name)}"
        if not isinstance(entry, dict):
            raise DataError(f"dataset {name!r} must be an object", where, "give root, annotation, data_augment, repeat_time")
        unknown = set(entry) - META_KEYS
        if unknown:
            raise DataError(f"dataset {name!r} has unknown key(s) {sorted(unknown)}", where,
                            f"the keys are {', '.join(sorted(META_KEYS))}")
        for key in ("root", "annotation"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise DataError(f"dataset {name!r}: `{key}` is missing or not a string", where,
                                f'add "{key}": "path/..." (relative to the current folder or to the meta file)')
        if not entry["annotation"].endswith(".jsonl"):
            raise DataError(f"dataset {name!r}: annotation {entry['annotation']!r} is not a .jsonl file", where,
                            "convert it to JSON Lines: one sample object per line")
        if entry["root"].startswith("s3://") or entry["annotation"].startswith("s3://"):
            raise DataError(f"dataset {name!r}: s3:// paths need the petrel client, which is not supported", where,
                            "copy the data to a local or mounted file system")
        augment = entry.get("data_augment", False)
        if not isinstance(augment, bool):
            raise DataError(f"dataset {name!r}: data_augment must be true or false, got {augment!r}", where, "write true or false")
        repeat = entry.get("repeat_time", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not math.isfinite(repeat) or repeat < 0:
            raise DataError(f"dataset {name!r}: repeat_time must be a number >= 0, got {repeat!r}", where,
                            "use e.g. 0.5 (first half of the lines), 1, or 3 (three passes)")
        if repeat > 1 and float(repeat) != int(repeat):
            raise DataError(f"dataset {name!r}: repeat_time {repeat} is above 1 but not a whole number", where,
                            "use an integer above 1 (the reference requires it), or a fraction below 1")
        length = entry.get("length")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0):
            raise DataError(f"dataset {name!r}: length must be a non-negative integer, got {length!r}", where,
                            "write the number of lines of the JSONL file, or drop the key")
        max_patch = entry.get("max_dynamic_patch")
        if max_patch is not None and (isinstance(max_patch, bool) or not isinstance(max_patch, int) or max_patch < 1):
            raise DataError(f"dataset {name!r}: max_dynamic_patch must be an integer >= 1, got {max_patch!r}", where,
                            "write e.g. 6, or drop the key to use --max_dynamic_patch")
        specs.append(DatasetSpec(
            name=name, root=_resolve(entry["root"], base), annotation=_resolve(entry["annotation"], base),
            data_augment=augment, repeat_time=repeat, length=length, max_dynamic_patch=max_patch, meta_path=path,
        ))
    return specs


def _line_of_key(text: str, key: str) -> int:
    pos = text.find(json.dumps(key))
    return text.count("\n", 0, pos) + 1 if pos >= 0 else 1


class JsonlIndex:
    """Random access to the non-empty lines of a JSONL file through a byte-offset index.

    Attributes:
        path: the file.
        offsets: int64 start offset of each non-empty line.
        line_numbers: 1-based line number of each entry, or None when no line was skipped (then it is index + 1).
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self.offsets, self.line_numbers = scan_line_starts(path)
        except FileNotFoundError:
            raise DataError(f"annotation file not found: {path}", fix="fix `annotation` in the meta JSON") from None
        except IsADirectoryError:
            raise DataError(f"annotation {path} is a folder", fix="point `annotation` at the .jsonl file") from None
        self._mm: mmap.mmap | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self):  # DataLoader workers re-open the map in their own process
        state = self.__dict__.copy()
        state["_mm"], state["_pid"] = None, -1
        return state

    def line_number(self, i: int) -> int:
        return int(self.line_numbers[i]) if self.line_numbers is not None else i + 1

    def raw(self, i: int) -> bytes:
        """The bytes of the ``i``-th non-empty line, without its line break."""
        if self._mm is None or self._pid != os.getpid():
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._pid = os.getpid()
        start = int(self.offsets[i])
        end = self._mm.find(b"\n", start)
        line = self._mm[start : len(self._mm) if end < 0 else end]
        return line[:-1] if line.endswith(b"\r") else line

    def read(self, i: int) -> dict:
        """Parse the ``i``-th non-empty line; bad JSON or a non-object raises DataError naming file:line."""
        where = f"{self.path}:{self.line_number(i)}"
        try:
            item = json.loads(self.raw(i))
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", where,
                            "each line must be one complete JSON object (no trailing commas, double quotes only)") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"the line is not UTF-8 text ({exc.reason} at byte {exc.start})", where,
                            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
        except RecursionError:  # json gives up on arrays/objects nested deeper than Python's recursion limit
            raise DataError("invalid JSON: nested too deeply", where,
                            "each line must be one complete JSON object (no trailing commas, double quotes only)") from None
        if not isinstance(item, dict):
            raise DataError(f"the line is a JSON {type(item).__name__}, not an object", where,
                            'write one {"conversations": [...]} object per line')
        return item


def scan_line_starts(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Offsets of the non-empty lines of ``path`` and, if some lines are empty, their 1-based line numbers."""
    size = os.path.getsize(path)
    if size == 0:
        return np.zeros(0, dtype=np.int64), None
    starts = [np.zeros(1, dtype=np.int64)]
    with open(path, "rb") as f:
        pos = 0
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            starts.append(newlines.astype(np.int64) + (pos + 1))
            pos += len(block)
    starts = np.concatenate(starts)
    starts = starts[starts < size]  # a final newline does not start a line
    ends = np.append(starts[1:] - 1, size)  # exclusive end (the newline or EOF)
    lengths = ends - starts
    # A line of just "\r" (CRLF files) or one blank character counts as empty too.
    empty = lengths == 0
    if (lengths == 1).any():
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            for i in np.flatnonzero(lengths == 1):
                empty[i] = mm[int(starts[i])] in (13, 32, 9)
            mm.close()
    if not empty.any():
        return starts, None
    keep = ~empty
    return starts[keep], (np.flatnonzero(keep) + 1).astype(np.int64)


KINDS = ("text", "image", "multi_image", "video")


def sample_kind(item: dict, where: str | None = None) -> str:
    """``text``, ``image``, ``multi_image`` or ``video``, by the reference's rules (a list of one image is multi_image)."""
    image, video = item.get("image"), item.get("video")
    if image is not None and not isinstance(image, (str, list)):
        raise DataError(f"`image` must be a path or a list of paths, got {type(image).__name__}", where,
                        'write "image": "a.jpg" or "image": ["a.jpg", "b.jpg"]')
    if image:
        if isinstance(image, list) and not all(isinstance(p, str) and p for p in image):
            raise DataError("`image` list must hold non-empty path strings", where, 'write "image": ["a.jpg", "b.jpg"]')
        return "multi_image" if isinstance(image, list) else "image"
    if video is not None and video != "":
        if not isinstance(video, str):
            raise DataError(f"`video` must be a path string, got {type(video).__name__}", where, 'write "video": "clip.mp4"')
        return "video"
    return "text"
