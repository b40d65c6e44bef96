"""Fixtures of the objectives' tests: a tiny InternVL2-1B checkpoint (the real Qwen2 tokenizer)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_1b(tmp_path_factory) -> Path:
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    return write_tiny_checkpoint("internvl2-1b", tmp_path_factory.mktemp("tiny") / "InternVL2-1B")


@pytest.fixture(scope="session")
def qwen2(tiny_1b):
    """The tiny InternVL2-1B's tokenizer: the real Qwen2 BPE with the InternVL tokens."""
    from internvl_tune.models.internvl_chat.tokenizers import load_tokenizer

    return load_tokenizer(tiny_1b, model_max_length=100_000)
