"""One dataset's annotation file as InternVL lines, whatever the file and its line format.

The file is a JSONL file (``meta.JsonlIndex``), a Parquet file or a ``datasets`` ``save_to_disk`` folder
(``tables.TableIndex``); its lines are in the InternVL format, ms-swift's ``messages`` or LLaMA-Factory's ShareGPT
(``formats.FORMATS``), named by the meta entry's ``format`` or detected from the first line that parses. Readers
(training, ``data check``, ``eval chat``, the length estimates) get converted lines from :meth:`Annotations.read`
and name places with :meth:`Annotations.where` (``file:line``, or ``file:row N`` for tables).
"""

from __future__ import annotations

from internvl_tune.data.formats import convert, detect
from internvl_tune.data.meta import DatasetSpec, JsonlIndex
from internvl_tune.data.tables import TableIndex, is_table
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
        try:
            return cls(TableIndex(spec.annotation), spec)
        except DataError as exc:
            raise DataError(f"dataset {spec.name!r}: {exc.message}", spec.where, exc.fix) from None

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
