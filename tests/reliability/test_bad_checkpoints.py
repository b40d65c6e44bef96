"""Broken checkpoints and adapters through the commands a user runs (convert, chat, merge-lora): exit 2, a message
naming the file and the tensors or field, and the fix; never a traceback.

The library-level cases are in tests/models/test_strict_loading.py (each CheckpointError's full text); here the same
mistakes are met where users meet them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checkpoint_damage import edit_shard


@pytest.fixture
def ckpt(tiny_checkpoints, tmp_path):
    """A private copy of the tiny InternLM2 checkpoint (two shards + index) to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["internvl2-2b"], dst)
    return dst


def edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _missing(state):
    state.pop("language_model.output.weight")


def _extra(state):
    state["language_model.model.layers.0.attention.extra.weight"] = torch.zeros(2)


def _misshaped(state):
    state["language_model.model.norm.weight"] = state["language_model.model.norm.weight"][:-1].clone()


def _truncate(path):
    shard = path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])


def _zero_byte(path):
    (path / "model-00001-of-00002.safetensors").write_bytes(b"")


DAMAGE = [
    ("missing_tensor", lambda p: edit_shard(p, _missing), ["missing parameters", "lm_head.weight",
                                                           "config.json belongs to these weights"]),
    ("extra_tensor", lambda p: edit_shard(p, _extra), ["unexpected tensors", "attention.extra.weight"]),
    ("misshaped_tensor", lambda p: edit_shard(p, _misshaped), ["wrong shape", "(63,) in file, (64,) expected"]),
    ("truncated_shard", _truncate, ["model-00001-of-00002.safetensors: file is truncated", "re-download"]),
    ("zero_byte_shard", _zero_byte, ["model-00001-of-00002.safetensors: file is truncated (0 bytes)"]),
    ("missing_shard", lambda p: (p / "model-00002-of-00002.safetensors").unlink(), ["names shard(s) that are not in",
                                                                                     "finish the download"]),
    ("no_weights", lambda p: [f.unlink() for f in p.glob("model*")], ["no weights found"]),
    ("no_config", lambda p: (p / "config.json").unlink(), ["config.json: file not found"]),
    ("config_not_json", lambda p: (p / "config.json").write_text('{"model_type": \n'), ["config.json:2: invalid JSON"]),
    ("config_not_utf8", lambda p: (p / "config.json").write_bytes(b"\xff\xfe{}"), ["config.json: not UTF-8 text"]),
    ("unknown_family", lambda p: edit_config(p, lambda c: c["llm_config"].__setitem__("architectures",
                                                                                      ["MistralForCausalLM"])),
     ["llm_config.architectures", "MistralForCausalLM", "not supported"]),
    ("other_model_family", lambda p: (p / "config.json").write_text(json.dumps(
        {"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]})),
     ["model_type 'qwen2_vl' is neither"]),
]
# convert copies config.json fields it does not use (a custom template), so this one is for chat only.
UNKNOWN_TEMPLATE = ("unknown_template", lambda p: edit_config(p, lambda c: c.__setitem__("template", "chatml")),
                    ["config.json: field 'template' is 'chatml'", "internlm2-chat"])


CASES = [("convert", *d) for d in DAMAGE] + [("chat", *d) for d in DAMAGE + [UNKNOWN_TEMPLATE]]


@pytest.mark.parametrize("command, damage, fragments", [(c, d, f) for c, _, d, f in CASES],
                         ids=[f"{c}-{n}" for c, n, *_ in CASES])
def test_damaged_checkpoint(ckpt, tmp_path, cli, command, damage, fragments):
    damage(ckpt)
    if command == "convert":
        result = cli("convert", ckpt, tmp_path / "out", "--to", "native")
        assert not (tmp_path / "out").exists()  # nothing half-written
    else:
        result = cli("chat", ckpt, "Hi", "--max-new-tokens", "2")
    assert result.code == 2, result
    assert all(f in result.err for f in fragments), result.err


@pytest.fixture
def adapter(tiny_checkpoints, tmp_path):
    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.lora import add_lora, save_adapter

    chat = load_pretrained(tiny_checkpoints["internvl2-2b"])
    add_lora(chat, llm_rank=2)
    return save_adapter(chat, tmp_path / "adapter", base=tiny_checkpoints["internvl2-2b"])


def test_adapter_for_another_base_model(adapter, tiny_checkpoints, tmp_path, cli):
    result = cli("merge-lora", adapter, "--base", tiny_checkpoints["internvl2-4b"], "--out", tmp_path / "m")
    assert result.code == 2 and "this adapter was trained on" in result.err and "family: adapter internlm2, model phi3" \
        in result.err and "pass that base model" in result.err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("damage, fragment", [
    (lambda a: (a / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes()[:100]),
     "adapter_model.safetensors: cannot read the adapter weights"),
    (lambda a: (a / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    (lambda a: (a / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    (lambda a: (a / "adapter_config.json").write_text("{"), "adapter_config.json:1: invalid JSON"),
], ids=["truncated_weights", "no_weights", "no_config", "bad_config"])
def test_damaged_adapter(adapter, tiny_checkpoints, tmp_path, cli, damage, fragment):
    damage(adapter)
    result = cli("merge-lora", adapter, "--base", tiny_checkpoints["internvl2-2b"], "--out", tmp_path / "m")
    assert result.code == 2 and fragment in result.err, result.err


def test_base_checkpoint_given_as_adapter(tiny_checkpoints, tmp_path, cli):
    base = tiny_checkpoints["internvl2-2b"]
    result = cli("merge-lora", base, "--base", base, "--out", tmp_path / "m")
    assert result.code == 2 and "not a complete LoRA adapter directory" in result.err


@pytest.mark.parametrize("question, images, fragment", [
    ("<image>\nWhat?", [], "1 <image> placeholders for 0 images"),
    ("Hi", ["nope.jpg"], "image not found"),
    ("Hi", ["bomb.png"], "too large to decode safely"),
    ("Hi", ["zero.jpg"], "cannot decode image"),
], ids=["placeholder_without_image", "missing_image", "decompression_bomb", "zero_byte_image"])
def test_chat_input_mistakes(tiny_checkpoints, tmp_path, cli, question, images, fragment):
    from reliability_media import write_bad_media

    write_bad_media(tmp_path / "media")
    flags = [x for name in images for x in ("--image", tmp_path / "media" / name)]
    result = cli("chat", tiny_checkpoints["internvl2-2b"], question, *flags, "--max-new-tokens", "2")
    assert result.code == 2 and fragment in result.err, result.err
    assert "dataset root" not in result.err and "dataset's root" not in result.err  # chat has none (issue 20)
    if images:
        assert "error: --image: " in result.err and str(tmp_path / "media" / images[0]) in result.err


def test_truncated_internvl_cg_shard_is_a_clear_error(tmp_path):
    from internvl_tune.errors import CheckpointError
    from internvl_tune.models.internvl_cg.loading import load_internvl_cg
    from internvl_tune.testing.tiny_cg import write_tiny_internvl14b

    ckpt = write_tiny_internvl14b(tmp_path / "tiny14b")
    shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_internvl_cg(ckpt, dtype="fp32")
