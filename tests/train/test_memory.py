"""The memory estimate: exact model-state bytes, and activations that follow the checkpointing mode."""

import pytest
import torch

from internvl_tune.train.memory import estimate_training_memory

GIB = 2**30


def _model():
    torch.manual_seed(0)
    frozen, trained = torch.nn.Linear(1024, 1024, bias=False), torch.nn.Linear(1024, 256, bias=False)
    frozen.weight.requires_grad_(False)
    frozen.to(torch.bfloat16)
    return torch.nn.Sequential(frozen, trained), [frozen, trained]


def _estimate(mode, **kw):
    model, blocks = _model()
    shape = dict(tokens_per_micro_batch=8192, hidden=2048, ffn=8192, num_layers=24, vocab=92553)
    return estimate_training_memory(model, blocks, world_size=1, grad_checkpoint=mode, **{**shape, **kw})


def test_model_states_are_exact_bytes():
    est = _estimate(1.0)
    # frozen bf16: 2 bytes a weight; trained: fp32 master + gradient + two AdamW moments = 16 bytes
    assert est.model_states * GIB == 1024 * 1024 * 2 + 1024 * 256 * 16
    assert est.gathered_params * GIB == 1024 * 256 * 2  # one rank: a bf16 compute copy of what trains


def test_activations_follow_the_checkpointing_mode():
    full, half, none = (_estimate(m).activations for m in (1.0, 0.5, 0.0))
    selective = _estimate("selective").activations
    assert full < half < none and full < selective < none
    assert _estimate(0.0, compiled=True).activations < none  # fused blocks save fewer intermediates


def test_lora_dropout_and_a_trained_vision_tower_add_activations():
    base = _estimate(0.0).activations
    assert _estimate(0.0, lora_dropout_width=6 * 2048 + 8192).activations > base
    vision = dict(hidden=1024, ffn=4096, num_layers=24, tokens=40 * 1025)
    assert _estimate(1.0, vision=vision).activations > _estimate(1.0).activations


@pytest.mark.parametrize("world", [2, 8])
def test_several_ranks_shard_the_states(world):
    model, blocks = _model()
    one = estimate_training_memory(model, blocks, world_size=1, grad_checkpoint=1.0, tokens_per_micro_batch=1,
                                   hidden=8, ffn=8, num_layers=1)
    many = estimate_training_memory(model, blocks, world_size=world, grad_checkpoint=1.0, tokens_per_micro_batch=1,
                                    hidden=8, ffn=8, num_layers=1)
    assert many.model_states == pytest.approx(one.model_states / world)


# Peaks measured on one H200 (2026-12-03, docs/performance.md): InternVL2-8B shape, LoRA r16 (dropout 0.05) on the
# LLM, frozen ViT, compiled, 8192-token packed rows; and InternVL2-1B full fine-tuning, compiled, no checkpointing.
MEASURED_GIB = [("internvl2-8b", 16, "True", 21.69), ("internvl2-8b", 16, "selective", 39.3),
                ("internvl2-8b", 16, "0.5", 39.3), ("internvl2-8b", 16, "False", 72.23),
                ("internvl2-1b", 0, "False", 20.0)]


@pytest.fixture(scope="module")
def meta_models():
    """Real-shape models on the meta device (no memory), LoRA applied as the benchmark applied it."""
    from types import SimpleNamespace

    from transformers import InternVLForConditionalGeneration

    from internvl_tune.bench.shapes import native_config
    from internvl_tune.models.internvl_chat.chat import InternVLChat
    from internvl_tune.models.internvl_chat.config import original_from_native
    from internvl_tune.models.internvl_chat.lora import add_lora

    def build(shape, lora):
        cfg = native_config(shape)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("meta"):
                model = InternVLForConditionalGeneration(cfg)
        finally:
            torch.set_default_dtype(default)
        model.model.vision_tower.requires_grad_(False)
        tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda token: cfg.image_token_id, pad_token_id=0)
        chat = InternVLChat(model, tokenizer, original_from_native(cfg.to_dict()))
        if lora:
            model.requires_grad_(False)
            add_lora(chat, llm_rank=lora)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        return chat

    return {(shape, lora): build(shape, lora) for shape, lora in {(s, r) for s, r, _, _ in MEASURED_GIB}}


@pytest.mark.parametrize("shape, lora, mode, peak", MEASURED_GIB)
def test_estimate_within_15_percent_of_the_measured_peaks(meta_models, shape, lora, mode, peak):
    from internvl_tune.dist.parallelize import parse_grad_checkpoint
    from internvl_tune.models.internvl_chat.recipe import memory_shape

    chat = meta_models[(shape, lora)]
    dims = memory_shape(chat, 8192, lora_dropout=0.05 if lora else 0.0, tiles_per_micro_batch=64)
    est = estimate_training_memory(chat.model, [], world_size=1, grad_checkpoint=parse_grad_checkpoint(mode),
                                   compiled=True, **dims)
    assert abs(est.total / peak - 1) <= 0.15, est.describe()


def test_auto_takes_the_fewest_checkpointed_blocks_that_fit_with_headroom():
    from internvl_tune.train.memory import AUTO_MARGIN, choose_grad_checkpoint

    def estimate(fraction):
        return _estimate(fraction, compiled=True)

    no_ckpt, all_ckpt = estimate(0.0).total, estimate(1.0).total
    assert choose_grad_checkpoint(estimate, no_ckpt * AUTO_MARGIN + 0.01)[0] == 0.0  # a big card: no recompute
    half = estimate(0.5).total * AUTO_MARGIN
    fraction, chosen = choose_grad_checkpoint(estimate, half + 0.01)
    assert 0.0 < fraction <= 0.5 and chosen.total * AUTO_MARGIN <= half + 0.01
    assert choose_grad_checkpoint(estimate, all_ckpt)[0] == 1.0  # nothing fits with headroom: every block
    assert choose_grad_checkpoint(estimate, 0.1)[0] == 1.0


def test_auto_on_a_gpu_asks_for_its_free_memory(monkeypatch):
    """The trainer's side of ``auto``, without a GPU: free + held memory is what the choice may use."""
    from types import SimpleNamespace

    from internvl_tune.train.trainer import Trainer

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * GIB)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # one process, whatever ran before
    need = {0.0: 60.0, 0.25: 45.0, 0.5: 36.0, 0.75: 30.0, 1.0: 20.0}  # GiB by checkpointed fraction
    fake = SimpleNamespace(info=SimpleNamespace(device=torch.device("cuda")),
                           recipe=SimpleNamespace(memory_shape=lambda per_device_batch: {}),
                           cfg=SimpleNamespace(train=SimpleNamespace(per_device_train_batch_size=1)),
                           memory_estimate=lambda mode: SimpleNamespace(total=need[mode]))
    mode, note = Trainer._resolve_grad_checkpoint(fake, "auto")
    assert mode == 0.75 and "40.0 GiB available" in note  # 36 x 1.15 > 40 >= 30 x 1.15
    assert Trainer._resolve_grad_checkpoint(fake, 0.5) == (0.5, "")
    cpu = SimpleNamespace(info=SimpleNamespace(device=torch.device("cpu")), memory_estimate=fake.memory_estimate)
    assert Trainer._resolve_grad_checkpoint(cpu, "auto")[0] == 1.0


def test_moe_estimate_holds_every_expert_and_the_active_width():
    """A mixture-of-experts LLM: model states are every expert's bytes; activations grow with the routed copies and
    the router, checked against the formula written out."""
    from torch import nn

    from internvl_tune.train import memory

    model = nn.Linear(4, 4, bias=False)  # stand-in: states do not depend on the MoE shape
    common = dict(world_size=1, tokens_per_micro_batch=1000, hidden=64, ffn=2 * 32, num_layers=3,
                  grad_checkpoint=0.0)
    dense = memory.estimate_training_memory(model, [], **common)
    moe = memory.estimate_training_memory(model, [], **common, moe=dict(top_k=2, experts=8))
    extra = (memory.MOE_ROUTED_BYTES * 2 * 64 + memory.MOE_ROUTER_BYTES * 8) * 1000 * 3
    assert abs((moe.activations - dense.activations) * 2**30 - extra) < 1e-3
