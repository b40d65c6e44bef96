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
