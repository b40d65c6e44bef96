"""Fixtures: one tiny InternVL-14B-layout checkpoint per session (random weights, runtime-trained tokenizer)."""

import pytest

from internvl_tune.testing.tiny_cg import write_tiny_internvl14b


@pytest.fixture(scope="session")
def tiny_cg(tmp_path_factory):
    return write_tiny_internvl14b(tmp_path_factory.mktemp("internvl14b_tiny"))
