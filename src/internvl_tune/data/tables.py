"""Annotation files that are tables: Parquet files and Hugging Face ``datasets`` saved to disk (Arrow).

They give rows instead of JSONL lines; :class:`TableIndex` reads them with the interface of ``meta.JsonlIndex``
(``len``, ``read(i)`` -> a dict, ``line_number(i)``, ``where(i)``), so every reader of annotation files takes them.
A row's place in messages is ``file:row N`` (1-based). The rows hold whatever columns the file has; a column of the
Hugging Face ``Image`` feature arrives as ``{"bytes": ..., "path": ...}`` and ``data/formats.py`` turns it into an
embedded image.

- ``*.parquet``: read one row group at a time (the last one kept), so a file larger than memory works.
- a folder written by ``Dataset.save_to_disk`` (``state.json`` + ``data-*.arrow``): the Arrow files are memory-mapped
  (nothing is read until a row is). A ``DatasetDict`` folder (``dataset_dict.json``) holds one folder per split:
  point ``annotation`` at the split's folder.

pyarrow is the optional ``[datasets]`` extra; without it, a table annotation is an error naming the extra.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from internvl_tune.environment import require
from internvl_tune.errors import DataError


def is_table(path: str) -> bool:
    """True for a Parquet file or a ``save_to_disk`` folder (what :class:`TableIndex` reads)."""
    return path.endswith(".parquet") or os.path.isdir(path)


def check_folder(path: str) -> Path:
    """The ``state.json`` of a ``save_to_disk`` folder; a DataError for a folder that is not one."""
    folder = Path(path)
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{path} is a DatasetDict (splits {', '.join(splits)})", path,
                        f"point `annotation` at one split's folder, e.g. {folder / (splits[0] if splits else 'train')}")
    state = folder / "state.json"
    if not state.is_file():
        raise DataError(f"annotation {path} is a folder without state.json", path,
                        "point `annotation` at a .jsonl or .parquet file, or at a folder written by "
                        "datasets' save_to_disk")
    return state


class TableIndex:
    """Random access to the rows of a Parquet file or a ``save_to_disk`` folder.

    Attributes:
        path: the file or folder.
        files: the Arrow / Parquet files in row order.
        starts: the first row of each file (and of each Parquet row group), with the total row count last.
    """

    def __init__(self, path: str):
        self.path = path
        require("pyarrow", f"{path}: reading a table annotation (Parquet / Arrow)")
        self.files, sizes = self._parts(path)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache: tuple[int, object] | None = None  # (part, its table), this process's
        self._pid = -1

    def _parts(self, path: str) -> tuple[list[tuple[str, int]], list[int]]:
        """``([(file, row group or -1)], [rows of each])``."""
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(path).metadata
            except FileNotFoundError:
                raise DataError(f"annotation file not found: {path}", fix="fix `annotation` in the meta JSON") from None
            except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a broken file vary by version
                raise DataError(f"not a readable Parquet file ({exc})", f"{path}", "write the file again") from None
            return [(path, g) for g in range(meta.num_row_groups)], [meta.row_group(g).num_rows
                                                                     for g in range(meta.num_row_groups)]
        folder = Path(path)
        state = check_folder(path)
        names = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        parts, sizes = [], []
        for name in names:
            table = self._arrow(str(folder / name))
            parts.append((str(folder / name), -1))
            sizes.append(table.num_rows)
        return parts, sizes

    @staticmethod
    def _arrow(file: str):
        """A memory-mapped Arrow table (``save_to_disk`` writes the streaming format)."""
        import pyarrow as pa

        try:
            return pa.ipc.open_stream(pa.memory_map(file)).read_all()
        except FileNotFoundError:
            raise DataError(f"{file} is missing", file, "save the dataset again (save_to_disk)") from None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):  # DataLoader workers open the files in their own process
        state = self.__dict__.copy()
        state["_cache"], state["_pid"] = None, -1
        return state

    def line_number(self, i: int) -> int:
        """The 1-based row of the ``i``-th row."""
        return i + 1

    def where(self, i: int) -> str:
        return f"{self.path}:row {i + 1}"

    def read(self, i: int) -> dict:
        """The ``i``-th row as a dict of its columns."""
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        if self._cache is None or self._cache[0] != part or self._pid != os.getpid():
            file, group = self.files[part]
            if group >= 0:
                import pyarrow.parquet as pq

                table = pq.ParquetFile(file).read_row_group(group)
            else:
                table = self._arrow(file)
            self._cache, self._pid = (part, table), os.getpid()
        row = self._cache[1].slice(i - int(self.starts[part]), 1).to_pylist()[0]
        if not isinstance(row, dict):
            raise DataError("the row is not a record", self.where(i), "store one sample per row")
        return row
