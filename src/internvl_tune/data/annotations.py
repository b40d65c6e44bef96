"""One dataset's annotation file as InternVL lines, whatever the file and its line format.

The file is a JSONL file (``meta.JsonlIndex``), a Parquet file or a ``datasets`` ``save_to_disk`` folder
(``tables.TableIndex``); its lines are in the InternVL format, ms-swift's ``messages`` or LLaMA-Factory's ShareGPT
(``formats.FORMATS``), named by the meta entry's ``format`` or detected from the first line that parses. Readers
(training, ``data check``, ``eval chat``, the length estimates) get converted lines from :meth:`Annotations.read`
and name places with :meth:`Annotations.where` (``file:line``, or ``file:row N`` for tables).
"""

from __future__ import annotations

import os

from internvl_tune.data.formats import convert, detect
from internvl_tune.data.meta import DatasetSpec, JsonlIndex, annotation_errors, read_meta
from internvl_tune.data.tables import TableIndex, check_folder, is_table
from internvl_tune.errors import DataError

_DETECT_LINES = 5  # lines tried for one that parses, when the first ones are broken


class Annotations:
    """Random access to a dataset's samples as InternVL lines.

    Attributes:
        source: the file's index (``JsonlIndex`` or ``TableIndex``).
        format: the line format (a key of ``formats.FORMATS``).
        detected: True when the format was detected rather than named in the meta entry.
    """

    def __init__(self, source, spec: DatasetSpec):
        self.source, self.spec = source, spec
        self.detected = spec.format is None
        self.format = spec.format or self._detect()

    @classmethod
    def of(cls, spec: DatasetSpec) -> Annotations:
        """The annotations of ``spec``; an unreadable file is a DataError naming the dataset and its meta line."""
        if not is_table(spec.annotation):
            return cls(JsonlIndex.of(spec), spec)
        with spec.errors():
            return cls(TableIndex(spec.annotation), spec)

    @staticmethod
    def check(spec: DatasetSpec) -> None:
        """That the annotation of ``spec`` is there and can be opened, with the error :meth:`of` would give, without
        reading it: what training checks before it loads the model (``check_meta``)."""
        with spec.errors():
            if os.path.isdir(spec.annotation):
                check_folder(spec.annotation)
            else:
                with annotation_errors(spec.annotation, spec.annotation_tried):
                    open(spec.annotation, "rb").close()

    def _detect(self) -> str:
        for i in range(min(_DETECT_LINES, len(self.source))):
            try:
                return detect(self.source.read(i))
            except DataError:
                continue
        return "internvl"

    @property
    def path(self) -> str:
        return self.source.path

    def __len__(self) -> int:
        return len(self.source)

    def line_number(self, i: int) -> int:
        return self.source.line_number(i)

    def where(self, i: int) -> str:
        return self.source.where(i)

    def read(self, i: int) -> dict:
        """The ``i``-th sample as an InternVL line (DataError at its place when it does not fit the format)."""
        return convert(self.source.read(i), self.format, self.spec.format_options, self.where(i))


def check_meta(path) -> list[DatasetSpec]:
    """The datasets of the meta JSON ``path`` (``read_meta``), each annotation checked to be there and readable.

    Reads no line: cheap enough to run before anything slow, so that a mistake in the meta JSON is the first thing
    a run reports, not what it says after minutes of loading weights.
    """
    specs = read_meta(path)
    for spec in specs:
        Annotations.check(spec)
    return specs
