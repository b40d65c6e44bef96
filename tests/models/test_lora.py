"""LoRA: reference targets per family on native names, alpha = 2r, merge, adapter save/load with a base check."""

from __future__ import annotations

import json

import pytest
import torch

from internvl_tune.errors import CheckpointError
from internvl_tune.models.internvl_chat import load_pretrained
from internvl_tune.models.internvl_chat.lora import add_lora, has_lora, load_adapter, merge_lora, save_adapter


def _randomize_lora(chat, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in chat.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def _logits(chat):
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        return chat.model(input_ids=ids).logits


@pytest.mark.parametrize("like, expected", [
    ("internvl2-2b", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("internvl2-4b", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
])
def test_targets_ranks_and_alpha(like, expected, tiny_dirs):
    chat = load_pretrained(tiny_dirs(like))
    add_lora(chat, llm_rank=4, vision_rank=2)
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in chat.model.named_modules() if isinstance(m, LoraLayer)}
    llm = {n.rsplit(".", 1)[-1] for n in layers if ".language_model." in n}
    vit = {n.rsplit(".", 1)[-1] for n in layers if ".vision_tower." in n}
    assert llm == expected
    assert vit == {"q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"}
    some_llm = next(m for n, m in layers.items() if ".language_model." in n)
    some_vit = next(m for n, m in layers.items() if ".vision_tower." in n)
    assert some_llm.r["default"] == 4 and some_llm.lora_alpha["default"] == 8
    assert some_vit.r["default"] == 2 and some_vit.lora_alpha["default"] == 4
    assert some_llm.lora_dropout["default"].p == 0.05
    assert not any(p.requires_grad for n, p in chat.model.named_parameters() if "base_layer" in n)


def test_merge_save_load_and_wrong_base(tiny_dirs, tmp_path):
    chat = load_pretrained(tiny_dirs("internvl2-2b"))
    add_lora(chat, llm_rank=4)
    _randomize_lora(chat)
    chat.model.eval()
    with_adapter = _logits(chat)
    save_adapter(chat, tmp_path / "adapter", base=tiny_dirs("internvl2-2b"))
    merge_lora(chat)
    assert not has_lora(chat)
    torch.testing.assert_close(_logits(chat), with_adapter, atol=1e-5, rtol=0)
    assert set(chat.model.state_dict()) == set(load_pretrained(tiny_dirs("internvl2-2b")).model.state_dict())

    again = load_pretrained(tiny_dirs("internvl2-2b"))
    load_adapter(again, tmp_path / "adapter")
    again.model.eval()
    torch.testing.assert_close(_logits(again), with_adapter, atol=1e-6, rtol=0)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    info = json.loads((tmp_path / "adapter" / "internvl_tune_adapter.json").read_text())
    assert config["base_model_name_or_path"].endswith("internvl2-2b") and config["r"] == 4 and config["lora_alpha"] == 8
    assert info["lora"]["llm_rank"] == 4 and info["base_model"]["family"] == "internlm2"

    other = load_pretrained(tiny_dirs("internvl2-1b"))
    with pytest.raises(CheckpointError, match="this adapter was trained on .*internvl2-2b.*differs"):
        load_adapter(other, tmp_path / "adapter")
