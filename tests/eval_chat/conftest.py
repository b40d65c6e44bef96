"""Fixtures of the eval chat tests: a tiny chat checkpoint and a small meta JSON over the bundled sample."""

from __future__ import annotations

from pathlib import Path

import pytest
from sample_meta import sample_meta, tiny_chat_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("tiny_eval_chat"))


@pytest.fixture(scope="session")
def meta(tmp_path_factory) -> Path:
    """Three lines of each kind: text (the third is a two-turn conversation), image, multi-image, video."""
    return sample_meta(tmp_path_factory.mktemp("eval_chat_meta"), 3)
