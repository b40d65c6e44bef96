"""The bundled sample (examples/sample) cut down for quick tests: a meta JSON over the first lines of each kind."""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample"


def sample_meta(folder: Path, lines: int) -> Path:
    """The bundled meta JSON over the first ``lines`` lines of each of its four JSONL files (absolute paths, each
    line once)."""
    meta = json.loads((SAMPLE / "meta.json").read_text())
    for name, spec in meta.items():
        src = SAMPLE / spec["annotation"]
        dst = folder / f"{name}.jsonl"
        dst.write_text("\n".join(src.read_text().splitlines()[:lines]) + "\n")
        spec.update(root=str(SAMPLE / spec["root"]), annotation=str(dst), repeat_time=1, length=lines)
    path = folder / "meta.json"
    path.write_text(json.dumps(meta))
    return path


def tiny_chat_model(folder: Path) -> Path:
    """A tiny InternVL2-1B-layout checkpoint (real Qwen2 tokenizer, random weights, 56 px tiles)."""
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    return write_tiny_checkpoint("internvl2-1b", folder / "InternVL2-1B", image_size=56)
