"""Parquet files and ``datasets`` saved to disk as annotations: rows by index, embedded images, row-numbered errors.

The ``save_to_disk`` folder is written here as that function writes it (state.json naming the Arrow stream files);
when the ``datasets`` package is installed, a folder it wrote itself is read too.
"""

import io
import json

import pytest
from PIL import Image

from internvl_tune.data.formats import EmbeddedImage, FormatOptions, convert, detect
from internvl_tune.data.tables import TableIndex, is_table
from internvl_tune.errors import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the Hugging Face Image feature


def _png(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="PNG")
    return out.getvalue()


def _rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"<image>Colour {i}?"}, {"role": "assistant", "content": "red"}],
             "images": [{"bytes": _png((255, 0, 0)), "path": f"red{i}.png"}]} for i in range(n)]


def _table(rows):
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.Table.from_pylist(rows, schema=pa.schema([("messages", messages), ("images", pa.list_(IMAGE))]))


def test_parquet_rows_across_row_groups_convert_with_their_embedded_images(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(_table(_rows(5)), path, row_group_size=2)
    index = TableIndex(str(path))
    assert is_table(str(path)) and len(index) == 5 and index.where(3) == f"{path}:row 4"
    row = index.read(3)
    assert row["messages"][0]["content"] == "<image>Colour 3?"
    line = convert(row, detect(row), FormatOptions(), index.where(3))
    assert line["image"] == EmbeddedImage(_png((255, 0, 0)), "red3.png")
    assert Image.open(io.BytesIO(line["image"].data)).getpixel((0, 0)) == (255, 0, 0)


def _save_to_disk(folder, rows, files=2):
    """What ``Dataset.save_to_disk`` writes: Arrow stream shards named in state.json."""
    folder.mkdir()
    table, names, start = _table(rows), [], 0
    for k in range(files):
        size = len(rows) // files + (k < len(rows) % files)
        name = f"data-{k:05d}-of-{files:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(start, size))
        names.append({"filename": name})
        start += size
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_split": "train"}))
    (folder / "dataset_info.json").write_text("{}")


def test_a_saved_dataset_folder_reads_across_its_arrow_files(tmp_path):
    _save_to_disk(tmp_path / "ds", _rows(5))
    index = TableIndex(str(tmp_path / "ds"))
    assert len(index) == 5
    assert [index.read(i)["messages"][0]["content"] for i in (4, 0, 3)] == ["<image>Colour 4?", "<image>Colour 0?",
                                                                           "<image>Colour 3?"]


def test_a_dataset_dict_folder_asks_for_a_split(tmp_path):
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match=r"is a DatasetDict \(splits train, test\).*dd/train"):
        TableIndex(str(tmp_path / "dd"))


def test_a_folder_written_by_the_datasets_package(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                                  "images": datasets.Sequence(datasets.Image())})
    rows = _rows(3)
    encoded = features.encode_batch({"messages": [r["messages"] for r in rows], "images": [r["images"] for r in rows]})
    table = pa.Table.from_pydict(encoded, schema=features.arrow_schema)
    # (built from a table with a fixed fingerprint: datasets' hashing of features breaks with some dill versions)
    datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint="t").save_to_disk(
        str(tmp_path / "saved"))
    index = TableIndex(str(tmp_path / "saved"))
    line = convert(index.read(2), "messages", FormatOptions(), index.where(2))
    assert isinstance(line["image"], EmbeddedImage) and line["image"].name == "red2.png"
    assert Image.open(io.BytesIO(line["image"].data)).getpixel((0, 0)) == (255, 0, 0)


def test_without_pyarrow_the_extra_is_named(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(Exception, match=r"internvl-tune\[datasets\]"):
        TableIndex(str(tmp_path / "train.parquet"))
