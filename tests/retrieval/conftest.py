"""Fixtures: a tiny InternVL-14B-layout checkpoint and the repository's embedded sample data."""

from pathlib import Path

import pytest

from internvl_tune.testing.tiny_cg import write_tiny_internvl14b

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_internvl14b(tmp_path_factory.mktemp("internvl14b_tiny_retrieval"))


@pytest.fixture(scope="session")
def sample_dir():
    if not (SAMPLE / "flickr30k" / "flickr30k_test_karpathy.txt").is_file():
        pytest.skip("examples/sample/flickr30k is missing")
    return SAMPLE
