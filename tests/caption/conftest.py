"""Fixtures for the caption tests (helpers live in caption_fixtures.py so spawned workers can import them)."""

from __future__ import annotations

import json
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
def bare_flickr_root(tmp_path) -> Path:
    """The bundled Flickr30K sample as the InternVL release names it: file names without ``Images/``."""
    folder = Path(shutil.copytree(Path(__file__).resolve().parents[2] / "examples/sample/flickr30k",
                                  tmp_path / "data/flickr30k"))
    js = folder / "flickr30k_test_karpathy.json"
    data = json.loads(js.read_text())
    for image in data["images"]:
        image["file_name"] = image["file_name"].removeprefix("Images/")
    js.write_text(json.dumps(data))
    return folder.parent


@pytest.fixture
def captioner() -> ColourCaptioner:
    return ColourCaptioner()


@pytest.fixture
def needs_java() -> None:
    if shutil.which("java") is None:
        pytest.skip("java not found: METEOR and the PTB tokenizer need it (apt-get install default-jre-headless)")
