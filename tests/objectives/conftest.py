"""Fixtures of the objectives' tests: a tiny InternVL2-1B checkpoint (the real Qwen2 tokenizer)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_1b(tmp_path_factory) -> Path:
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    return write_tiny_checkpoint("internvl2-1b", tmp_path_factory.mktemp("tiny") / "InternVL2-1B")
