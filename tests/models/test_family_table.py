"""The family table (models/internvl_chat/families.py): a new dense family is one entry, and the entries say what the
code does per family (LoRA targets under reference names, the registry's refusals)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from chat_helpers import chat_logits, image_inputs, train_on_sample

from internvl_tune.errors import CheckpointError
from internvl_tune.models.internvl_chat import families, load_pretrained
from internvl_tune.models.internvl_chat.families import Family
from internvl_tune.models.internvl_chat.lora import add_lora


@pytest.fixture
def registry(monkeypatch):
    """The family registry, restored after the test."""
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))
    return families


def test_a_new_dense_family_is_one_table_entry(registry, tiny_dirs, tmp_path):
    """A Llama-shaped LLM under an architecture name nothing else knows: one register() call makes it load strictly,
    give the logits of the same weights loaded as a Llama, fine-tune with LoRA and convert both ways."""
    llama = tiny_dirs("internvl2-76b")
    ckpt = tmp_path / "mini"
    shutil.copytree(llama, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["llm_config"].update(architectures=["MiniLlamaForCausalLM"], model_type="minillama")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="MiniLlamaForCausalLM.* is not supported"):
        load_pretrained(ckpt)

    registry.register(Family("minillama", ("MiniLlamaForCausalLM",), "llama", native_owner=False,
                             extra_keys=("attention_bias", "mlp_bias", "head_dim")))
    chat = load_pretrained(ckpt)
    assert chat.family == "minillama"
    ids, pixel_values = image_inputs(chat)
    expected = chat_logits(load_pretrained(llama), ids, pixel_values)
    torch.testing.assert_close(chat_logits(chat, ids, pixel_values), expected, atol=0, rtol=0)

    losses, _ = train_on_sample(ckpt, tmp_path / "run", steps=1, use_llm_lora=4, freeze_llm=True)
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["llm_config"]["architectures"] == \
        ["MiniLlamaForCausalLM"]

    native = load_pretrained(chat.save_pretrained(tmp_path / "native", layout="native"))
    back = load_pretrained(native.save_pretrained(tmp_path / "original", layout="original"))
    assert native.family == back.family == "minillama"
    for converted in (native, back):
        torch.testing.assert_close(chat_logits(converted, ids, pixel_values), expected, atol=0, rtol=0)


def test_the_registry_refuses_a_taken_name_or_architecture(registry):
    with pytest.raises(ValueError, match="registered already"):
        registry.register(Family("qwen2", ("Qwen2NewForCausalLM",), "qwen2"))
    with pytest.raises(ValueError, match="registered already"):
        registry.register(Family("qwen2b", ("Qwen2ForCausalLM",), "qwen2"))
    assert registry.by_native_type("llama").name == "llama"  # InternLM2 / InternLM3 run as Llamas; Llama owns the type


@pytest.mark.parametrize("like, given, expected", [
    ("internvl2-2b", ["attention.wqkv", "wo"], {"q_proj", "k_proj", "v_proj", "o_proj"}),  # InternLM2's own names
    ("internvl2-2b", ["q_proj", "down_proj"], {"q_proj", "down_proj"}),
    ("internvl2-4b", ["self_attn.qkv_proj"], {"qkv_proj"}),
])
def test_lora_targets_take_the_reference_names_of_the_family(like, given, expected, tiny_dirs):
    chat = load_pretrained(tiny_dirs(like))
    add_lora(chat, llm_rank=2, llm_target_modules=given)
    wrapped = {name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name, _ in chat.model.named_parameters()
               if ".language_model." in name and ".lora_A." in name}
    assert wrapped == expected
