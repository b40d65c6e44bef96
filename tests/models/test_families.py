"""InternVL2.5 and InternVL3 next to InternVL2: every release's tiny checkpoint loads strictly with its own template;
InternLM3 (InternVL3-9B) runs as a Llama with the logits of its published modeling code; MoE and unequal InternLM3
biases are refused; full and LoRA fine-tuning take the template from the checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from chat_helpers import chat_logits, image_inputs, train_on_sample

from internvl_tune.errors import CheckpointError
from internvl_tune.models.internvl_chat import config as cfg
from internvl_tune.models.internvl_chat import load_pretrained
from internvl_tune.models.internvl_chat.loading import iter_tensors
from internvl_tune.testing.tiny_chat import NATIVE_RELEASES, RELEASES


@pytest.mark.parametrize("like", [*RELEASES, *NATIVE_RELEASES])
def test_every_release_loads_strictly_with_its_template(like, tiny_dirs):
    release = RELEASES[NATIVE_RELEASES.get(like, like)]
    chat = load_pretrained(tiny_dirs(like))
    assert (chat.family, chat.template) == (release.family, release.template)
    assert chat.tokens_added == 0  # the releases carry the InternVL tokens already
    vision = chat.model.config.vision_config
    assert (vision.use_qk_norm, vision.norm_type) == (("6B" in release.vision), ("rms_norm" if "6B" in release.vision
                                                                                 else "layer_norm"))
    ids, pixel_values = image_inputs(chat)
    out = chat_logits(chat, ids, pixel_values)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, chat_logits(chat, ids, pixel_values.flip(-1)))  # the image reaches the LLM
    assert cfg.checkpoint_data_defaults(tiny_dirs(like)).template == release.template


# ------------------------------------------------------------------------------------------------ InternLM3 = Llama
def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def internlm3_logits(weights: dict, llm: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM3ForCausalLM's forward as its published modeling code defines it (q/k/v biases by ``qkv_bias``, o_proj and
    MLP biases by ``bias``, ``head_dim`` from the config, dynamic-NTK rope past ``max_position_embeddings``), written
    out in plain torch over the original-layout tensors of an InternVL3-9B checkpoint."""
    w = lambda name: weights.get(f"language_model.{name}")  # noqa: E731
    heads, kv_heads, hd = llm["num_attention_heads"], llm["num_key_value_heads"], llm["head_dim"]
    eps, n = llm["rms_norm_eps"], ids.shape[-1]
    base, scaling = float(llm["rope_theta"]), llm.get("rope_scaling") or {}
    if scaling.get("rope_type") == "dynamic" and n > llm["max_position_embeddings"]:
        factor = scaling["factor"]
        base *= (factor * n / llm["max_position_embeddings"] - (factor - 1)) ** (hd / (hd - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.cat([torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)] * 2, dim=-1)
    cos, sin = angles.cos(), angles.sin()

    def linear(x, name):
        bias = w(f"{name}.bias")
        return x @ w(f"{name}.weight").T + (0 if bias is None else bias)

    h = w("model.embed_tokens.weight")[ids[0]]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(llm["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        x = _rms(h, w(layer + "input_layernorm.weight"), eps)
        q = linear(x, layer + "self_attn.q_proj").view(n, heads, hd).transpose(0, 1)
        k = linear(x, layer + "self_attn.k_proj").view(n, kv_heads, hd).transpose(0, 1)
        v = linear(x, layer + "self_attn.v_proj").view(n, kv_heads, hd).transpose(0, 1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, dim=-1) @ v
        h = h + linear(attn.transpose(0, 1).reshape(n, heads * hd), layer + "self_attn.o_proj")
        x = _rms(h, w(layer + "post_attention_layernorm.weight"), eps)
        gate = torch.nn.functional.silu(linear(x, layer + "mlp.gate_proj"))
        h = h + linear(gate * linear(x, layer + "mlp.up_proj"), layer + "mlp.down_proj")
    return (_rms(h, w("model.norm.weight"), eps) @ w("lm_head.weight").T)[None]


def _internlm3_checkpoint(tiny_dirs, tmp_path, **llm_changes):
    """The tiny InternVL3-9B, or a copy whose llm_config has ``llm_changes`` (random weights of that shape)."""
    from internvl_tune.models.internvl_chat.loading import build_empty_model
    from internvl_tune.models.internvl_chat.saving import write_original_checkpoint
    from internvl_tune.testing.tiny_chat import randomize_

    src = tiny_dirs("internvl3-9b")
    if not llm_changes:
        return src
    out = tmp_path / "internvl3-9b-changed"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    original = json.loads((src / "config.json").read_text())
    original["llm_config"].update(llm_changes)
    model = build_empty_model(cfg.native_config(original, image_token_id=0)).to_empty(device="cpu")
    randomize_(model, seed=3)
    write_original_checkpoint(out, model.state_dict(), original)
    return out


@pytest.mark.parametrize("changes", [{}, {"qkv_bias": True, "bias": True, "max_position_embeddings": 8}],
                         ids=["release", "biases+dynamic-rope"])
def test_internlm3_runs_as_llama_with_its_own_logits(changes, tiny_dirs, tmp_path):
    path = _internlm3_checkpoint(tiny_dirs, tmp_path, **changes)
    chat = load_pretrained(path)
    text = chat.model.config.text_config
    assert text.model_type == "llama" and text.head_dim == 24 != text.hidden_size // text.num_attention_heads
    assert text.attention_bias == text.mlp_bias == bool(changes)
    weights = {key: tensor.float() for key, tensor, _ in iter_tensors(path)}
    ids = torch.randint(0, 400, (1, 20), generator=torch.Generator().manual_seed(0))  # 20 > 8: dynamic rope acts
    with torch.no_grad():
        ours = chat.model(input_ids=ids).logits
    expected = internlm3_logits(weights, json.loads((path / "config.json").read_text())["llm_config"], ids)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-5)


def test_internlm3_with_unequal_biases_is_refused(tiny_dirs, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs("internvl3-9b"), out)
    config = json.loads((out / "config.json").read_text())
    config["llm_config"]["qkv_bias"] = True
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: llm_config.qkv_bias = True and llm_config.bias = False"):
        load_pretrained(out)


def test_internlm3_tokenizer_decodes_without_internlm2_spaces(tiny_dirs):
    chat = load_pretrained(tiny_dirs("internvl3-9b"))
    tok = chat.tokenizer
    assert type(tok).__name__ == "InternLM3Tokenizer" and tok("Hi").input_ids[0] == tok.bos_token_id == 1
    ids = tok("A cat , sitting.<|im_end|>", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "A cat , sitting.<|im_end|>"  # no space before <|im_end|>, no " ," clean-up
    internlm2 = load_pretrained(tiny_dirs("internvl2_5-8b")).tokenizer  # the same sentencepiece model
    assert internlm2.decode(internlm2("A cat , sitting.<|im_end|>").input_ids[1:]) == " A cat, sitting.<|im_end|>"


@pytest.mark.parametrize("where", ["llm_config.moe_config", "vision_config.use_moe"])
def test_mixture_of_experts_is_refused(where, tiny_dirs, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs("internvl2_5-8b"), out)
    config = json.loads((out / "config.json").read_text())
    part, key = where.split(".")
    config[part][key] = {"num_experts": 8} if key == "moe_config" else True
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config.json: field {where} .*not supported"):
        load_pretrained(out)


# ------------------------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("like", ["internvl2_5-8b", "internvl3-9b", pytest.param("internvl3-8b", marks=pytest.mark.slow),
                                  pytest.param("internvl3_5-8b", marks=pytest.mark.slow)])
def test_full_and_lora_fine_tuning_with_the_checkpoint_template(like, tiny_dirs, tmp_path):
    from internvl_tune.models.internvl_chat.lora import load_adapter

    base = tiny_dirs(like)
    for name, flags in (("full", {}), ("lora", {"use_llm_lora": 4, "freeze_llm": True, "freeze_mlp": True})):
        losses, template = train_on_sample(base, tmp_path / name, **flags)
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses) and template == "internvl2_5"
        trained = load_pretrained(tmp_path / name)
        assert (trained.template, trained.family) == ("internvl2_5", RELEASES[like].family)
        ids, pixel_values = image_inputs(trained)
        assert isinstance(trained.chat(pixel_values=pixel_values, question="Describe it.", max_new_tokens=3), str)
    adapted = load_pretrained(base)
    load_adapter(adapted, tmp_path / "lora" / "adapter")
    torch.testing.assert_close(chat_logits(trained, ids, pixel_values), chat_logits(adapted, ids, pixel_values), atol=1e-5,
                               rtol=0)  # the exported merge is the base with the adapter


def test_the_docs_table_lists_every_release():
    table = (Path(__file__).resolve().parents[2] / "docs" / "checkpoints.md").read_text()
    assert [like for like in [*RELEASES, *NATIVE_RELEASES] if f"(`{like}`)" not in table] == []
