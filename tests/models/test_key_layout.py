"""Fused q/k/v layouts, checked against examples indexed by hand (not by a round trip, which a bug made the same way
in both directions would pass).

InternLM2's ``wqkv`` rows come per KV head: that group's query heads, one key head, one value head. With 4 query
heads, 2 KV heads and head_dim 1 the rows are ``q0 q1 k0 v0 | q2 q3 k1 v1``: q = rows [0, 1, 4, 5], k = [2, 6],
v = [3, 7]. InternViT's ``attn.qkv`` is three equal thirds. Phi-3's ``qkv_proj`` / ``gate_up_proj`` are fused the
same way in the original and the native model, so their rows are never moved.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from internvl_tune.models.internvl_chat.key_map import LayoutSpec, convert_original_tensor, to_original
from internvl_tune.models.internvl_chat.lora import Adapter, LoraSettings, write_adapter_files
from internvl_tune.models.internvl_chat.lora_convert import convert_adapter

WQKV = "language_model.model.layers.0.attention.wqkv.weight"
NATIVE_QKV = "model.language_model.layers.0.self_attn.{}_proj.weight"
VIT_QKV = "vision_model.encoder.layers.1.attn.qkv.{}"
NATIVE_VIT = "model.vision_tower.encoder.layer.1.attention.{}_proj.{}"


def _rows(n: int, width: int = 3) -> torch.Tensor:
    """Row i holds i everywhere: a tensor whose rows say where they came from."""
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, width).clone()


@pytest.mark.parametrize("head_dim, q_rows, k_rows, v_rows", [
    (1, [0, 1, 4, 5], [2, 6], [3, 7]),
    (2, [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]),  # a head's rows stay together
])
def test_internlm2_wqkv_rows_are_grouped_per_kv_head(head_dim, q_rows, k_rows, v_rows):
    spec = LayoutSpec("internlm2", num_heads=4, num_kv_heads=2, head_dim=head_dim)
    wqkv = _rows(8 * head_dim)
    split = dict(convert_original_tensor(WQKV, wqkv, spec))
    assert set(split) == {NATIVE_QKV.format(p) for p in "qkv"}
    for p, rows in zip("qkv", (q_rows, k_rows, v_rows)):
        assert split[NATIVE_QKV.format(p)][:, 0].tolist() == rows, p
    # joining hand-made q / k / v puts each row back where the hand-indexed layout says
    parts = {NATIVE_QKV.format(p): _rows(len(r)) + 100 * (i + 1) for i, (p, r) in enumerate(zip("qkv", (q_rows, k_rows, v_rows)))}
    joined = to_original(parts, spec)[WQKV][:, 0]
    for i, (p, rows) in enumerate(zip("qkv", (q_rows, k_rows, v_rows))):
        assert joined[rows].tolist() == [100 * (i + 1) + j for j in range(len(rows))], p


@pytest.mark.parametrize("family", ["qwen2", "internlm2", "phi3"])
def test_internvit_qkv_is_three_equal_thirds(family):
    spec = LayoutSpec(family, num_heads=4, num_kv_heads=2, head_dim=1)
    width = 4
    for leaf, tensor in (("weight", _rows(3 * width)), ("bias", torch.arange(3.0 * width))):
        split = dict(convert_original_tensor(VIT_QKV.format(leaf), tensor, spec))
        for i, p in enumerate("qkv"):
            got = split[NATIVE_VIT.format(p, leaf)]
            assert got.reshape(width, -1)[:, 0].tolist() == list(range(i * width, (i + 1) * width)), (p, leaf)
        assert torch.equal(to_original(split, spec)[VIT_QKV.format(leaf)], tensor)


@pytest.mark.parametrize("module, rows", [("self_attn.qkv_proj", 4 + 2 + 2), ("mlp.gate_up_proj", 2 * 6)])
def test_phi3_fused_layers_are_not_reordered(module, rows):
    """Phi-3's own code and transformers' Phi-3 both read qkv_proj as [q | k | v] and gate_up_proj as [gate | up]:
    the tensor must reach the native model under the same leaf name with its rows untouched."""
    spec = LayoutSpec("phi3", num_heads=4, num_kv_heads=2, head_dim=1)
    original = f"language_model.model.layers.0.{module}.weight"
    tensor = _rows(rows)
    [(name, got)] = convert_original_tensor(original, tensor, spec)
    assert name == f"model.language_model.layers.0.{module}.weight" and torch.equal(got, tensor)
    assert torch.equal(to_original({name: got}, spec)[original], tensor)


def test_lora_on_q_k_v_becomes_one_fused_pair_in_the_original_layout(tmp_path):
    """Per-projection LoRA pairs -> one pair on the fused linear: A = [A_q; A_k; A_v] (rank 3r), B block-diagonal
    with its rows in the fused order, each B scaled by its alpha / r (so the fused pair's own scaling is 1).
    LLM (InternLM2 wqkv): rank 1, alpha 2; ViT (qkv, width 2): rank 2, alpha 3."""
    llm_a = {"q": [[1.0, 2.0]], "k": [[3.0, 4.0]], "v": [[5.0, 6.0]]}
    llm_b = {"q": [[1.0], [2.0], [3.0], [4.0]], "k": [[5.0], [6.0]], "v": [[7.0], [8.0]]}
    vit_a = {"q": [[1.0, 2.0], [3.0, 4.0]], "k": [[5.0, 6.0], [7.0, 8.0]], "v": [[9.0, 10.0], [11.0, 12.0]]}
    vit_b = vit_a
    lora = {}
    for p in "qkv":
        for module, a, b in ((f"model.language_model.layers.0.self_attn.{p}_proj", llm_a, llm_b),
                             (f"model.vision_tower.encoder.layer.0.attention.{p}_proj", vit_a, vit_b)):
            lora[f"{module}.lora_A.weight"] = torch.tensor(a[p])
            lora[f"{module}.lora_B.weight"] = torch.tensor(b[p])
    settings = LoraSettings(llm_rank=1, vision_rank=2, llm_alpha=2, vision_alpha=3, lora_dropout=0.0,
                            llm_target_modules=("q_proj", "k_proj", "v_proj"),
                            vision_target_modules=("q_proj", "k_proj", "v_proj"))
    facts = {"family": "internlm2", "llm_heads": 4, "llm_kv_heads": 2, "llm_head_dim": 1}
    (tmp_path / "native").mkdir()
    write_adapter_files(tmp_path / "native", Adapter(settings, facts, None, lora, {}, []))
    convert_adapter(tmp_path / "native", tmp_path / "original", "original")
    out = load_file(str(tmp_path / "original" / "adapter_model.safetensors"))
    prefix = "base_model.model."

    wqkv = prefix + "language_model.model.layers.0.attention.wqkv"
    assert out[f"{wqkv}.lora_A.weight"].tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    # wqkv rows q0 q1 k0 v0 q2 q3 k1 v1; column 0 belongs to A_q, 1 to A_k, 2 to A_v; alpha / r = 2
    assert out[f"{wqkv}.lora_B.weight"].tolist() == [
        [2.0, 0, 0], [4.0, 0, 0], [0, 10.0, 0], [0, 0, 14.0], [6.0, 0, 0], [8.0, 0, 0], [0, 12.0, 0], [0, 0, 16.0]]

    qkv = prefix + "vision_model.encoder.layers.0.attn.qkv"
    assert out[f"{qkv}.lora_A.weight"].tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0],
                                                     [11.0, 12.0]]
    # the ViT's qkv rows are [q | k | v]; columns 0-1 belong to A_q, 2-3 to A_k, 4-5 to A_v; alpha / r = 1.5
    assert out[f"{qkv}.lora_B.weight"].tolist() == [
        [1.5, 3.0, 0, 0, 0, 0], [4.5, 6.0, 0, 0, 0, 0], [0, 0, 7.5, 9.0, 0, 0], [0, 0, 10.5, 12.0, 0, 0],
        [0, 0, 0, 0, 13.5, 15.0], [0, 0, 0, 0, 16.5, 18.0]]

    config = json.loads((tmp_path / "original" / "adapter_config.json").read_text())
    # scaling 1 everywhere, also for a consumer that ignores the patterns: lora_alpha = r, alpha pattern = rank pattern
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
    assert sorted([config["r"], *config["rank_pattern"].values()]) == [3, 6]
