"""Fixtures of the reliability tests: a CLI runner that fails on tracebacks, bad files, tiny tokenizers/checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass
class CliResult:
    code: int
    out: str  # stdout with rich's line wrapping undone
    err: str


@pytest.fixture
def cli(capsys):
    """Run ``internvl-tune ARGS`` in-process; any exception escaping ``main`` (a traceback for the user) fails."""
    from internvl_tune.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse rejects a flag value: its own usage message, exit 2
            code = exc.code
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out
        return CliResult(code, " ".join(captured.out.split()), " ".join(captured.err.split()))

    return run


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Tiny original-layout checkpoints of two families (InternLM2 2B-like, Phi-3 4B-like); fast to write."""
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_ckpt")
    out = {like: write_tiny_checkpoint(like, root / like, seed=1) for like in ("internvl2-2b", "internvl2-4b")}
    # the released tile size (448 px, 256 tokens a tile), for checks of image-token budgets
    out["internvl2-2b-448"] = write_tiny_checkpoint("internvl2-2b", root / "internvl2-2b-448", seed=1, image_size=448)
    return out


@pytest.fixture(scope="session")
def tiny_1b(tmp_path_factory):
    """A tiny InternVL2-1B (Qwen2) checkpoint, for training runs."""
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    return write_tiny_checkpoint("internvl2-1b", tmp_path_factory.mktemp("tiny") / "InternVL2-1B")


@pytest.fixture(scope="session")
def sample_meta(tmp_path_factory):
    """A meta JSON over the first 4 lines of the sample's text and image files (absolute paths)."""
    import json
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2] / "examples" / "sample"
    out = tmp_path_factory.mktemp("meta")
    meta = {}
    for name in ("sample_image", "sample_text"):
        spec = json.loads((sample / "meta.json").read_text())[name]
        lines = (sample / spec["annotation"]).read_text().splitlines()[:4]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        meta[name] = {**spec, "root": str(sample / spec["root"]), "annotation": str(out / f"{name}.jsonl"),
                      "length": len(lines)}
    (out / "meta.json").write_text(json.dumps(meta))
    return out / "meta.json"


@pytest.fixture(scope="session")
def finished_runs(tiny_1b, sample_meta, tmp_path_factory):
    """Two finished tiny runs (read-only for tests: copy before damaging): ``full`` (LLM + projector trained) and
    ``lora`` (LLM LoRA), each with checkpoint-1, checkpoint-2 and the final model."""
    import os

    from train_helpers import run_chat, train_config

    root = tmp_path_factory.mktemp("runs")
    old = os.umask(0o022)
    try:
        runs = {"full": run_chat(train_config(tiny_1b, sample_meta, root / "full")),
                "lora": run_chat(train_config(tiny_1b, sample_meta, root / "lora", use_llm_lora=4,
                                              freeze_llm=True, freeze_mlp=True))}
    finally:
        os.umask(old)
    return {name: result.output_dir for name, result in runs.items()} | {
        f"{name}_losses": result.losses for name, result in runs.items()}


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be written into: mode 0555, or for root (whom modes do not stop) a read-only tmpfs."""
    import os
    import subprocess

    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root and cannot mount a read-only tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
