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
