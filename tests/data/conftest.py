"""Fixtures of the data tests: real tokenizers written once per session, and a scratch copy of the sample."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """name -> tokenizer: the real Qwen2 BPE (InternVL2-1B) and tiny InternLM2 / Phi-3 / Yi sentencepiece ones."""
    from internvl_tune.models.internvl_chat.tokenizers import load_tokenizer
    from internvl_tune.testing.tiny_chat import write_tiny_tokenizer

    out = {}
    for style in ("qwen2", "internlm2", "phi3", "yi"):
        path = tmp_path_factory.mktemp(f"tok_{style}")
        write_tiny_tokenizer(style, path)
        out[style] = load_tokenizer(path, model_max_length=100_000)
    return out


@pytest.fixture(scope="session")
def qwen2(tokenizers):
    return tokenizers["qwen2"]


@pytest.fixture
def sample_copy(tmp_path):
    """A writable copy of examples/sample (chat files only) for corrupting."""
    dst = tmp_path / "sample"
    shutil.copytree(SAMPLE, dst, ignore=shutil.ignore_patterns("coco", "flickr30k", "nocaps", "*.py", "*.md"))
    return dst
