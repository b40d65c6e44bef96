"""The meta JSON (which datasets, where) and lazily read JSONL annotation files.

Meta JSON, as the reference defines it::

    {"my-dataset": {"root": "images/", "annotation": "train.jsonl", "data_augment": false,
                    "repeat_time": 1, "length": 1234, "max_dynamic_patch": 6}}

A relative ``root`` / ``annotation`` is looked up in the current directory first (the reference's behaviour) and
then in the meta file's folder, so a meta JSON next to its data works from anywhere unless the current directory
holds a path of the same name. When both places hold it, the current directory's is used and the spec says so
(``DatasetSpec.notice``); when neither does, messages name both absolute paths (``root_tried``).

A JSONL file is opened by scanning it once for line starts (numpy over 16 MiB blocks) and keeping only an int64
offset per line that holds something; blank and whitespace-only lines are skipped (as JSON Lines readers do) and the
others keep their line numbers in the file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from internvl_tune.data.formats import FormatOptions, format_options
from internvl_tune.errors import DataError

META_KEYS = {"root", "annotation", "data_augment", "repeat_time", "length", "max_dynamic_patch",
             "format", "columns", "tags"}  # the last three: the line format (data/formats.py)
_BLOCK = 16 << 20
_BOM = b"\xef\xbb\xbf"
_BLANK = b" \t\r"  # JSON whitespace besides the newline that ends a line


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
        line: the line of the dataset's name in the meta JSON.
        root_tried: the absolute folders ``root`` was looked up in, in order (empty: ``root`` is used as given).
        annotation_tried: the same for ``annotation``.
        notice: set when a relative ``root`` / ``annotation`` exists both in the current directory and beside the
            meta file: which one is used.
        format: the line format the entry names (``formats.FORMATS``), or None to detect it from the file.
        format_options: the entry's ``columns`` and ``tags`` (LLaMA-Factory's names for the ShareGPT keys).
    """

    name: str
    root: str
    annotation: str
    data_augment: bool = False
    repeat_time: float = 1
    length: int | None = None
    max_dynamic_patch: int | None = None
    meta_path: str | None = None
    line: int = 1
    root_tried: tuple[str, ...] = ()
    annotation_tried: tuple[str, ...] = ()
    notice: str | None = None
    format: str | None = None
    format_options: FormatOptions = field(default_factory=FormatOptions)

    @property
    def where(self) -> str | None:
        """``meta.json:line`` of this dataset, for messages."""
        return f"{self.meta_path}:{self.line}" if self.meta_path else None

    @contextmanager
    def errors(self):
        """A DataError about this dataset's files inside the block names the dataset and its line in the meta JSON."""
        try:
            yield
        except DataError as exc:
            raise DataError(f"dataset {self.name!r}: {exc.message}", self.where, exc.fix) from None

    def num_samples(self, num_lines: int) -> int:
        """Samples this dataset contributes per epoch, given its number of usable lines."""
        if self.repeat_time < 1:
            return int(num_lines * self.repeat_time)
        return num_lines * int(self.repeat_time)

    def line_of(self, sample: int, num_lines: int) -> int:
        """Index (into the usable lines) of the ``sample``-th sample: a prefix for < 1, wrap-around for > 1."""
        return sample % num_lines


def _locate(value: str, base: Path) -> tuple[str, tuple[str, ...], str | None]:
    """``(path to use, absolute candidates tried, both-exist note)`` for a relative ``root`` / ``annotation``.

    The current directory comes first (the reference's behaviour), then the meta file's folder ``base``.
    """
    if os.path.isabs(value):
        return value, (), None
    here, beside = os.path.abspath(value), os.path.normpath(base / value)
    if here == beside:
        return value, (here,), None
    found = [p for p in (here, beside) if os.path.exists(p)]
    note = None
    if len(found) == 2 and not os.path.samefile(here, beside):
        note = (f"{value!r} exists both in the current directory ({here}) and beside the meta file ({beside}); "
                f"using {here} (the current directory comes first; write an absolute path to choose)")
    return (beside if found == [beside] else value), (here, beside), note


class _Object(dict):
    """A JSON object that remembers the keys it held more than once (json keeps only the last value)."""

    repeated: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, object]]) -> _Object:
    obj = _Object(pairs)
    seen: set[str] = set()
    obj.repeated = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _key_lines(text: str, key: str) -> list[int]:
    """1-based lines where ``"key":`` occurs in the JSON ``text``."""
    pattern = re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:"
    return [text.count("\n", 0, m.start()) + 1 for m in re.finditer(pattern, text)]


def read_meta(path: str | os.PathLike) -> list[DatasetSpec]:
    """Parse and validate a meta JSON (UTF-8, with or without a byte-order mark).

    Raises:
        DataError: for a missing file, bad JSON, a dataset name or key given twice, unknown or missing keys, or wrong
            value types, naming the file, line and dataset.
    """
    path = str(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"meta file not found: {path}", fix="pass the path of your meta JSON (--meta_path)") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"the meta JSON is not UTF-8 text (byte {exc.start})", f"{path}:1",
                        "save it as UTF-8 (JSON files must be UTF-8)") from None
    except OSError as exc:  # a directory, no permission, ...
        raise DataError(f"cannot read the meta JSON {path}: {exc.strerror}", fix="pass the path of your meta JSON file") from None
    try:
        meta = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", f"{path}:{exc.lineno}", "fix the JSON syntax") from None
    if not isinstance(meta, dict) or not meta:
        raise DataError("the meta JSON must be an object mapping dataset names to their settings", f"{path}:1",
                        'write {"name": {"root": "...", "annotation": "....jsonl", "data_augment": false, "repeat_time": 1}}')
    for name in meta.repeated:
        lines = _key_lines(text, name) or [1]
        also = f" (also at line {lines[0]})" if lines[0] != lines[-1] else ""
        raise DataError(f"dataset name {name!r} is given twice{also}; JSON keeps only the last entry, so the first "
                        "dataset would be dropped", f"{path}:{lines[-1]}", "give each dataset its own name")
    base = Path(path).resolve().parent
    specs = []
    for name, entry in meta.items():
        lines = _key_lines(text, name)
        line = lines[0] if lines else 1
        where = f"{path}:{line}"
        if not isinstance(entry, dict):
            raise DataError(f"dataset {name!r} must be an object", where, "give root, annotation, data_augment, repeat_time")
        for key in entry.repeated:
            at = [n for n in _key_lines(text, key) if n >= line]
            raise DataError(f"dataset {name!r}: key {key!r} is given twice; JSON keeps only the last value",
                            f"{path}:{at[1] if len(at) > 1 else line}", "keep one")
        unknown = set(entry) - META_KEYS
        if unknown:
            raise DataError(f"dataset {name!r} has unknown key(s) {sorted(unknown)}", where,
                            f"the keys are {', '.join(sorted(META_KEYS))}")
        for key in ("root", "annotation"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise DataError(f"dataset {name!r}: `{key}` is missing or not a string", where,
                                f'add "{key}": "path/..." (relative to the current folder or to the meta file)')
        if not entry["annotation"].endswith((".jsonl", ".parquet")) and not os.path.isdir(
                _locate(entry["annotation"], base)[0]):
            raise DataError(f"dataset {name!r}: annotation {entry['annotation']!r} is not a .jsonl or .parquet file, "
                            "nor a folder written by datasets' save_to_disk", where,
                            "convert it to JSON Lines (one sample object per line) or Parquet")
        line_format, options = format_options(entry, where)
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
        root, root_tried, root_note = _locate(entry["root"], base)
        annotation, annotation_tried, annotation_note = _locate(entry["annotation"], base)
        notes = [f"dataset {name!r}: {kind} {note}" for kind, note in (("root", root_note), ("annotation", annotation_note))
                 if note]
        specs.append(DatasetSpec(
            name=name, root=root, annotation=annotation, data_augment=augment, repeat_time=repeat, length=length,
            max_dynamic_patch=max_patch, meta_path=path, line=line, root_tried=root_tried,
            annotation_tried=annotation_tried, notice="; ".join(notes) or None, format=line_format,
            format_options=options,
        ))
    return specs


@contextmanager
def annotation_errors(path: str, tried: tuple[str, ...] = ()):
    """Opening the annotation file ``path`` inside the block: a missing (naming every place ``tried``), folder or
    unreadable file becomes its DataError."""
    try:
        yield
    except FileNotFoundError:
        looked = f" (looked for {' and '.join(tried)})" if len(tried) > 1 else ""
        raise DataError(f"annotation file not found: {path}{looked}",
                        fix="fix `annotation` in the meta JSON (relative paths start from the current directory, "
                            "then from the meta file's folder)") from None
    except IsADirectoryError:
        raise DataError(f"annotation {path} is a folder", fix="point `annotation` at the .jsonl file") from None
    except PermissionError:
        raise DataError(f"annotation {path} is not readable (permission denied)",
                        fix="give the training user read access") from None


class JsonlIndex:
    """Random access to the lines of a JSONL file that hold something, through a byte-offset index.

    Attributes:
        path: the file.
        offsets: int64 start offset of each line that is not blank.
        line_numbers: 1-based line number of each entry, or None when no line was skipped (then it is index + 1).
    """

    def __init__(self, path: str, tried: tuple[str, ...] = ()):
        self.path = path
        with annotation_errors(path, tried):
            self.offsets, self.line_numbers = scan_line_starts(path)
        self._mm: mmap.mmap | None = None
        self._pid = -1

    @classmethod
    def of(cls, spec: DatasetSpec) -> JsonlIndex:
        """The index of a dataset's annotation file; an error names the dataset, its line in the meta JSON and, for
        a missing file, every path tried."""
        with spec.errors():
            return cls(spec.annotation, spec.annotation_tried)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self):  # DataLoader workers re-open the map in their own process
        state = self.__dict__.copy()
        state["_mm"], state["_pid"] = None, -1
        return state

    def line_number(self, i: int) -> int:
        return int(self.line_numbers[i]) if self.line_numbers is not None else i + 1

    def where(self, i: int) -> str:
        """``file:line`` of the ``i``-th indexed line, for messages."""
        return f"{self.path}:{self.line_number(i)}"

    def raw(self, i: int) -> bytes:
        """The bytes of the ``i``-th indexed line, without its line break."""
        if self._mm is None or self._pid != os.getpid():
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._pid = os.getpid()
        start = int(self.offsets[i])
        end = self._mm.find(b"\n", start)
        line = self._mm[start : len(self._mm) if end < 0 else end]
        return line[:-1] if line.endswith(b"\r") else line

    def read(self, i: int) -> dict:
        """Parse the ``i``-th indexed line; bad JSON or a non-object raises DataError naming file:line."""
        where = self.where(i)
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
    """Offsets of the lines of ``path`` that are not blank and, if some are, their 1-based line numbers.

    A blank line holds nothing but spaces, tabs and a carriage return (a file's byte-order mark counts as nothing
    too). The scan keeps each line's first byte as it goes; only lines that start with one of those bytes are read
    again, so a file of ordinary lines costs one vectorised pass.
    """
    size = os.path.getsize(path)
    if size == 0:
        return np.zeros(0, dtype=np.int64), None
    starts, firsts = [np.zeros(1, dtype=np.int64)], []
    with open(path, "rb") as f:
        pos, line_starts_here, last = 0, True, 10
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            data = np.frombuffer(block, dtype=np.uint8)
            newlines = np.flatnonzero(data == 10)
            if line_starts_here:  # the previous block ended with a newline (or this is the first block)
                firsts.append(data[:1])
            firsts.append(data[newlines[newlines + 1 < len(data)] + 1])
            line_starts_here = len(newlines) > 0 and newlines[-1] == len(data) - 1
            starts.append(newlines.astype(np.int64) + (pos + 1))
            pos, last = pos + len(block), block[-1]
        starts = np.concatenate(starts)
        starts = starts[starts < size]  # a final newline does not start a line
        firsts = np.concatenate(firsts)
        ends = np.append(starts[1:] - 1, size - 1 if last == 10 else size)  # exclusive: the newline or EOF
        blank = ends == starts
        suspects = np.flatnonzero(~blank & np.isin(firsts, np.frombuffer(_BLANK + _BOM[:1], dtype=np.uint8)))
        for i in suspects.tolist():
            f.seek(int(starts[i]))
            text = f.read(int(ends[i] - starts[i]))
            blank[i] = not (text[3:] if i == 0 and text.startswith(_BOM) else text).strip(_BLANK)
    if not blank.any():
        return starts, None
    keep = ~blank
    return starts[keep], (np.flatnonzero(keep) + 1).astype(np.int64)


def require_samples(specs: list[DatasetSpec], num_lines: list[int]) -> None:
    """A meta JSON whose datasets give no sample at all (empty files, ``repeat_time`` 0) is an error.

    ``num_lines`` are the usable lines of each dataset's annotation file.
    """
    if not specs or sum(s.num_samples(n) for s, n in zip(specs, num_lines)) > 0:
        return
    parts = [f"{s.name!r} has {n} line(s) and repeat_time {s.repeat_time}" for s, n in zip(specs, num_lines)]
    raise DataError(f"the meta JSON gives no samples: dataset {'; '.join(parts)}", specs[0].where,
                    "add lines to the annotation files, or give a dataset a repeat_time above 0")


KINDS = ("text", "image", "multi_image", "video")


def sample_kind(item: dict, where: str | None = None) -> str:
    """``text``, ``image``, ``multi_image`` or ``video``, by the reference's rules (a list of one image is multi_image)."""
    image, video = item.get("image"), item.get("video")
    if image is not None and not isinstance(image, (str, list)):
        raise DataError(f"`image` must be a path or a list of paths, got {type(image).__name__}", where,
                        'write "image": "a.jpg" or "image": ["a.jpg", "b.jpg"]')
    if image and video not in (None, ""):
        raise DataError("the line has both `image` and `video`; a sample is one kind", where,
                        "split it into an image line and a video line")
    if image:
        if isinstance(image, list) and not all(isinstance(p, str) and p for p in image):
            raise DataError("`image` list must hold non-empty path strings", where, 'write "image": ["a.jpg", "b.jpg"]')
        return "multi_image" if isinstance(image, list) else "image"
    if video is not None and video != "":
        if not isinstance(video, str):
            raise DataError(f"`video` must be a path string, got {type(video).__name__}", where, 'write "video": "clip.mp4"')
        return "video"
    return "text"
