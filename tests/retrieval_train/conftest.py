"""Fixtures: a tiny InternVL-14B-layout checkpoint and the bundled sample's retrieval data."""

from pathlib import Path

import pytest

from internvl_tune.testing.tiny_cg import write_tiny_internvl14b

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """2 ViT layers, 3 QLLaMA layers (cross-attention in 0 and 2), 28 px, 4 queries, tied embeddings."""
    return write_tiny_internvl14b(tmp_path_factory.mktemp("internvl14b_tiny_train"))


@pytest.fixture(scope="session")
def sample_root() -> Path:
    if not (SAMPLE / "flickr30k" / "flickr30k_train_karpathy.txt").is_file():
        pytest.skip("examples/sample/flickr30k is missing")
    return SAMPLE
