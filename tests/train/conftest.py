"""Fixtures for training tests: tiny InternVL2 checkpoints and small meta files over the bundled sample."""

import json
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"


@pytest.fixture(scope="session")
def tiny_1b(tmp_path_factory) -> Path:
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    return write_tiny_checkpoint("internvl2-1b", tmp_path_factory.mktemp("tiny") / "InternVL2-1B")


@pytest.fixture(scope="session")
def subset_meta():
    """``subset_meta(tmp_path, n)``: a meta JSON over the first ``n`` lines of some sample JSONL files."""
    return _subset_meta


def _subset_meta(tmp_path: Path, n: int, kinds=("sample_image", "sample_text")) -> Path:
    """A meta JSON over the first ``n`` lines of some of the sample's JSONL files."""
    meta = json.loads((SAMPLE / "meta.json").read_text())
    out = {}
    for name, spec in meta.items():
        if name not in kinds:
            continue
        src = Path(spec["annotation"])
        src = src if src.is_absolute() else (SAMPLE / src)
        lines = src.read_text().splitlines()[:n]
        dst = tmp_path / f"{name}.jsonl"
        dst.write_text("\n".join(lines) + "\n")
        root = Path(spec["root"])
        out[name] = {**spec, "root": str(root if root.is_absolute() else SAMPLE / root), "annotation": str(dst),
                     "length": len(lines)}
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(out, indent=2))
    return path
