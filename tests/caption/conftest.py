"""Fixtures for the caption tests (helpers live in caption_fixtures.py so spawned workers can import them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from caption_fixtures import ColourCaptioner, build_tree


@pytest.fixture(scope="session")
def _tree_template(tmp_path_factory) -> Path:
    return build_tree(tmp_path_factory.mktemp("caption_template") / "data")


@pytest.fixture
def data_root(_tree_template, tmp_path) -> Path:
    """A fresh copy per test (tests may delete or convert files)."""
    return Path(shutil.copytree(_tree_template, tmp_path / "data"))


@pytest.fixture
def captioner() -> ColourCaptioner:
    return ColourCaptioner()


@pytest.fixture
def needs_java() -> None:
    if shutil.which("java") is None:
        pytest.skip("java not found: METEOR and the PTB tokenizer need it (apt-get install default-jre-headless)")
