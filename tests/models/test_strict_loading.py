"""Strict loading: every tensor used, every parameter filled, clear CheckpointErrors otherwise."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checkpoint_damage import edit_shard
from safetensors.torch import load_file

from internvl_tune.errors import CheckpointError
from internvl_tune.models.internvl_chat import load_pretrained


@pytest.fixture
def ckpt(tiny_dirs, tmp_path):
    """A private copy of the tiny InternLM2 checkpoint (two shards + index) that a test may damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs("internvl2-2b"), dst)
    return dst


def test_unknown_key_is_listed(ckpt):
    edit_shard(ckpt, lambda s: s.__setitem__("language_model.model.layers.0.attention.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*attention\.extra\.weight"):
        load_pretrained(ckpt)


def test_missing_key_is_listed(ckpt):
    edit_shard(ckpt, lambda s: s.pop("language_model.output.weight"))
    with pytest.raises(CheckpointError, match=r"missing parameters \(not in any file\) \(1\): lm_head\.weight"):
        load_pretrained(ckpt)


def test_wrong_dtype_is_listed(ckpt):
    def to_int(state):
        state["language_model.model.norm.weight"] = state["language_model.model.norm.weight"].to(torch.int32)

    edit_shard(ckpt, to_int)
    with pytest.raises(CheckpointError, match=r"non-float dtype.*model\.norm\.weight: torch\.int32"):
        load_pretrained(ckpt)


def test_misshaped_tensor_is_listed(ckpt):
    def shrink(state):
        state["language_model.model.norm.weight"] = state["language_model.model.norm.weight"][:-1].clone()

    edit_shard(ckpt, shrink)
    with pytest.raises(CheckpointError, match=r"wrong shape.*model\.norm\.weight: \(63,\) in file, \(64,\) expected"):
        load_pretrained(ckpt)


def test_truncated_shard_is_named(ckpt):
    shard = ckpt / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: file is truncated.*re-download"):
        load_pretrained(ckpt)


def test_missing_shard_is_named(ckpt):
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shard\(s\) that are not in .*model-00002-of-00002"):
        load_pretrained(ckpt)


def test_legacy_bin_loads_like_safetensors(ckpt, tmp_path):
    state = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        state.update(load_file(str(shard)))
        shard.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    chat = load_pretrained(ckpt)
    expected = state["language_model.model.norm.weight"].float()
    assert torch.equal(chat.model.model.language_model.norm.weight, expected)


def test_unsupported_llm_and_bad_json_are_clear(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["llm_config"]["architectures"] = ["MistralForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"llm_config\.architectures.*MistralForCausalLM.*not supported"):
        load_pretrained(ckpt)
    (ckpt / "config.json").write_text("{\n  \"model_type\": \n")
    with pytest.raises(CheckpointError, match=r"config\.json:3: invalid JSON"):
        load_pretrained(ckpt)


def test_save_refuses_to_overwrite(ckpt, tmp_path):
    chat = load_pretrained(ckpt)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        chat.save_pretrained(target)
    assert (target / "keep.txt").read_text() == "user data"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]  # no temp dir left behind
