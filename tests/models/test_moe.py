"""Mixture-of-experts layers (InternVL3.5-30B-A3B / 241B-A28B on Qwen3-MoE, GPT-OSS-20B-A4B): the grouped expert
products equal a per-expert loop (forward and gradients, experts without tokens, the fallback too), expert LoRA
equals its merged weights and loads in peft, the load-balancing loss is transformers' on the real tokens, the MoE
flags, MXFP4 experts dequantize as transformers does, and the per-expert checkpoint layout round-trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
from chat_helpers import chat_logits, image_inputs, train_on_sample

from internvl_tune.errors import UserError
from internvl_tune.models.common import moe, mxfp4
from internvl_tune.models.internvl_chat import load_pretrained

QWEN, GPT = "internvl3_5-30b-a3b", "internvl3_5-gpt-oss-20b-a4b"


def _loop_experts(experts, x, index, weights):
    """The reference: every expert in turn on its tokens, written out from the weights (no transformers code)."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        token, slot = torch.where(index == e)
        if not len(token):
            continue
        w_up = experts.gate_up_proj[e] if experts.is_transposed else experts.gate_up_proj[e].T
        h = x[token] @ w_up + (experts.gate_up_proj_bias[e] if experts.has_bias else 0)
        if hasattr(experts, "lora_A"):
            h = h + experts.lora_scaling * (x[token] @ experts.lora_A["gate_up_proj"][e].T
                                            @ experts.lora_B["gate_up_proj"][e].T)
        h = experts._apply_gate(h)
        w_down = experts.down_proj[e] if experts.is_transposed else experts.down_proj[e].T
        y = h @ w_down + (experts.down_proj_bias[e] if experts.has_bias else 0)
        if hasattr(experts, "lora_A"):
            y = y + experts.lora_scaling * (h @ experts.lora_A["down_proj"][e].T @ experts.lora_B["down_proj"][e].T)
        out = out.index_add(0, token, y * weights[token, slot, None])
    return out


def _experts(kind: str, lora: bool = False):
    from transformers import GptOssConfig, Qwen3MoeConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(0)
    if kind == "qwen3_moe":
        experts = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=6))
    else:
        experts = GptOssExperts(GptOssConfig(hidden_size=16, intermediate_size=8, num_local_experts=6))
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    if lora:
        moe.add_expert_lora(experts, rank=4, alpha=8, dropout=0.0)
        with torch.no_grad():
            for p in experts.lora_B.values():
                p.normal_(0, 0.3)
    return experts


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("kernel", [True, False])
def test_grouped_experts_equal_a_per_expert_loop(kind, lora, kernel, monkeypatch):
    """Forward and every gradient; experts 0 and 5 get no token; kernel=False takes the fallback."""
    if not kernel:
        monkeypatch.setattr(moe, "_kernel_usable", lambda x, w: False)
    experts = _experts(kind, lora)
    torch.manual_seed(1)
    x = torch.randn(7, 16, requires_grad=True)
    index = torch.tensor([[1, 2], [2, 3], [4, 1], [3, 4], [1, 4], [2, 1], [3, 2]])
    weights = torch.rand(7, 2, requires_grad=True)
    params = [x, weights, *(p for p in experts.parameters() if p.requires_grad)]
    expected = _loop_experts(experts, x, index, weights)
    got = moe.grouped_experts_forward(experts, x, index, weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(expected, params, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if kernel:  # the grouped kernel itself ran (16-byte rows in fp32 on the CPU)
        assert moe._kernel_usable(x, experts.down_proj)


def test_merged_expert_lora_equals_the_lora_forward():
    for kind in ("qwen3_moe", "gpt_oss"):
        experts = _experts(kind, lora=True)
        x, index, weights = torch.randn(5, 16), torch.randint(0, 6, (5, 2)), torch.rand(5, 2)
        with torch.no_grad():
            expected = moe.grouped_experts_forward(experts, x, index, weights)
            moe.merge_expert_lora(experts)
            assert not hasattr(experts, "lora_A")
            torch.testing.assert_close(moe.grouped_experts_forward(experts, x, index, weights), expected,
                                       atol=1e-5, rtol=1e-5)


def _switch_loss(logits: list[torch.Tensor], top_k: int, mask: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e P_e over the real tokens of every layer, written out."""
    experts = logits[0].shape[-1]
    picks, probs = torch.zeros(experts), torch.zeros(experts)
    for layer in logits:
        p = layer.softmax(-1)[mask]
        picks += torch.nn.functional.one_hot(p.topk(top_k).indices, experts).sum((0, 1)).float()
        probs += p.sum(0)
    rows = mask.sum() * len(logits)
    return experts * ((picks / rows) * (probs / rows)).sum()


def test_router_stats_give_the_switch_loss_on_real_tokens_only():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter, load_balancing_loss_func

    routers = [Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=8, num_experts=5, num_experts_per_tok=2))
               for _ in range(3)]
    for r in routers:
        torch.nn.init.normal_(r.weight)
    stats = moe.RouterStats(routers, num_experts=5, top_k=2)
    hidden = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    stats.start(mask)
    logits = [r(hidden)[0] for r in routers]
    stats.stop()
    loss = stats.loss(int(mask.sum()))
    torch.testing.assert_close(loss, _switch_loss([x.detach() for x in logits], 2, mask.reshape(-1)))
    torch.testing.assert_close(loss, load_balancing_loss_func(tuple(logits), 5, 2, mask.long()))
    [r(hidden) for r in routers]  # a forward outside start/stop (a recomputation) records nothing
    assert len(stats.counts) == 3
    stats.detach()


@pytest.mark.parametrize("like", [QWEN, GPT])
def test_moe_flags_set_what_trains(like, tiny_dirs):
    from internvl_tune.models.internvl_chat.recipe import ModelArgs, apply_trainable_flags

    def trained(**flags):
        chat = load_pretrained(tiny_dirs(like), weights=False)
        apply_trainable_flags(chat, ModelArgs(model_name_or_path="x", **flags))
        names = [n for n, p in chat.model.named_parameters() if p.requires_grad and ".layers.0.mlp." in n]
        return {n.split(".mlp.", 1)[1] for n in names}

    router = "gate.weight" if like == QWEN else "router.weight"
    assert router in trained() and "experts.down_proj" in trained()  # the reference's 3.5 SFT trains them all
    assert trained(freeze_llm=True) == set()
    lora = trained(use_llm_lora=4)  # auto: LoRA on the experts, router frozen
    assert lora == {f"experts.lora_{m}.{p}" for m in "AB" for p in ("gate_up_proj", "down_proj")}
    assert router in trained(use_llm_lora=4, moe_router="train")
    assert "experts.down_proj" in trained(use_llm_lora=4, moe_experts="train")
    assert trained(moe_experts="frozen", moe_router="frozen") == set()
    with pytest.raises(UserError, match="--use_llm_lora"):
        trained(moe_experts="lora")


@pytest.mark.parametrize("like", [QWEN, GPT])
def test_expert_lora_run_exports_an_adapter_peft_loads_and_a_merge(like, tiny_dirs, tmp_path):
    """A LoRA run with LoRA on the experts: its adapter (peft's target_parameters layout) gives the same logits in
    our loader and in peft, and the merged export equals the base with the adapter."""
    from peft import PeftModel

    from internvl_tune.models.internvl_chat.lora import load_adapter
    from internvl_tune.train.metrics import read_jsonl

    base = tiny_dirs(like)
    losses, _ = train_on_sample(base, tmp_path / "run", steps=2, use_llm_lora=4, lora_dropout=0.0)
    assert all(math.isfinite(x) for x in losses)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert all(r["aux_loss"] >= 2.0 - 1e-6 for r in rows)  # top-2 routing: the Switch loss is at least k
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

    adapted = load_pretrained(base)
    load_adapter(adapted, tmp_path / "run" / "adapter")
    ids, pixel_values = image_inputs(adapted)
    expected = chat_logits(adapted, ids, pixel_values)
    assert not torch.allclose(expected, chat_logits(load_pretrained(base), ids, pixel_values))  # it trained
    plain = load_pretrained(base)
    peft_model = PeftModel.from_pretrained(plain.model, str(tmp_path / "run" / "adapter"))
    with torch.no_grad():
        got = peft_model(inputs_embeds=plain.embed_inputs(ids, pixel_values)).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    merged = load_pretrained(tmp_path / "run")  # the merged final model
    torch.testing.assert_close(chat_logits(merged, ids, pixel_values), expected, atol=2e-2, rtol=0)  # bf16 files


def test_mxfp4_experts_dequantize_as_transformers_does(tiny_dirs, tmp_path):
    """A GPT-OSS checkpoint whose experts are MXFP4 (openai's release format) loads with the values transformers'
    own dequantization gives, and the plan can say how many were dequantized."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src = tiny_dirs(GPT)
    shutil.copytree(src, tmp_path / "mx")
    files = sorted((tmp_path / "mx").glob("model*.safetensors"))
    expected = {}
    for file in files:
        state = load_file(str(file))
        for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            blocks, scales = mxfp4.quantize(state.pop(key))
            state[key + "_blocks"], state[key + "_scales"] = blocks, scales
            expected[key] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            torch.testing.assert_close(mxfp4.dequantize(blocks, scales, torch.float32), expected[key], atol=0, rtol=0)
        save_file(state, str(file))
    index = tmp_path / "mx" / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {(k + s if k in expected else k): f for k, f in data["weight_map"].items()
                              for s in (("_blocks", "_scales") if k in expected else ("",))}
        index.write_text(json.dumps(data))
    chat = load_pretrained(tmp_path / "mx")
    assert chat.mxfp4_dequantized == len(expected) == 2 * 2  # two layers, two grouped tensors each
    state = chat.model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key.replace("language_model.model.", "model.language_model.")], value)


def test_qwen3_moe_per_expert_keys_round_trip(tiny_dirs, tmp_path):
    """The files hold one tensor per expert in both layouts (as the reference and transformers write them); the
    grouped parameter is them stacked, gate rows before up rows."""
    from safetensors import safe_open

    chat = load_pretrained(tiny_dirs(QWEN), dtype=None)
    with safe_open(str(next(tiny_dirs(QWEN).glob("model-00001*.safetensors"))), "pt") as f:
        gate = f.get_tensor("language_model.model.layers.0.mlp.experts.3.gate_proj.weight")
        up = f.get_tensor("language_model.model.layers.0.mlp.experts.3.up_proj.weight")
    grouped = chat.model.model.language_model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(grouped[3], torch.cat([gate, up]))
    chat.save_pretrained(tmp_path / "native", layout="native")
    with safe_open(str(next((tmp_path / "native").glob("model*.safetensors"))), "pt") as f:
        keys = list(f.keys())
    assert "model.language_model.layers.0.mlp.experts.7.down_proj.weight" in keys
    back = load_pretrained(tmp_path / "native", dtype=None)
    for key, value in chat.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[key], value), key


def _moe_steps(model, meta, out, extra) -> list[float]:
    import os

    from train_helpers import run_chat

    from internvl_tune.data.config import DataConfig
    from internvl_tune.models.internvl_chat.recipe import ModelArgs
    from internvl_tune.train.config import RunConfig, TrainArgs

    world = int(os.environ["WORLD_SIZE"])
    cfg = RunConfig(
        model=ModelArgs(model_name_or_path=model, freeze_backbone=True, grad_checkpoint="False", **extra),
        data=DataConfig(meta_path=meta, max_dynamic_patch=2, max_seq_length=1024),
        train=TrainArgs(output_dir=out, max_steps=3, per_device_train_batch_size=4 // world, learning_rate=1e-3,
                        logging_steps=1, save_steps=1000, dataloader_num_workers=0, report_to="none", seed=0,
                        device="cpu"))
    return run_chat(cfg).losses


@pytest.mark.slow
def test_two_gloo_ranks_train_a_moe_model_as_one(tiny_dirs, tmp_path):
    """FSDP2 over two processes, each decoder layer (its experts and router included) one unit: the same losses as
    one process, the load-balancing loss trained on (GPT-OSS's default 0.9), experts and routers trained in full."""
    from chat_helpers import SAMPLE
    from train_helpers import spawn

    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"sample_image": {"root": str(SAMPLE / "images"), "annotation": str(SAMPLE / "image.jsonl"),
                                                 "data_augment": False, "repeat_time": 1, "length": 14}}))
    model = str(tiny_dirs(GPT))
    one = spawn(1, _moe_steps, model, str(meta), str(tmp_path / "one"), {})
    two = spawn(2, _moe_steps, model, str(meta), str(tmp_path / "two"), {})
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one, two)
