"""Batch sampling across ranks / accumulation, lr schedules, parameter groups."""

import math

import pytest
import torch

from internvl_tune.data.batching import GlobalBatchSampler
from internvl_tune.train.optim import build_param_groups
from internvl_tune.train.schedule import LRSchedule, warmup_steps_for


def _sampler(rank=0, world=1, accum=1, bs=2, n=23, group=True, seed=3):
    lengths = [(i * 37) % 101 for i in range(n)]
    return GlobalBatchSampler(lengths, bs, world, rank, accum, seed, group)


def test_epoch_covers_every_sample_and_is_deterministic():
    s = _sampler(n=23, bs=2, world=2, accum=3)
    order = s.global_order(0)
    assert s.steps_per_epoch == math.ceil(23 / 12) == len(order)
    flat = [i for b in order for i in b]
    assert set(flat) == set(range(23))  # the wrap-around fill only repeats samples
    assert order == s.global_order(0)
    assert order != s.global_order(1)


def test_ranks_and_micro_steps_partition_the_global_batch():
    world, accum, bs = 2, 3, 2
    per_rank = [_sampler(rank=r, world=world, accum=accum, bs=bs) for r in range(world)]
    for step_batches in zip(*(s.epoch_steps(0) for s in per_rank)):
        union = [i for _, micros in step_batches for mb in micros for i in mb]
        global_batch = per_rank[0].global_order(0)[step_batches[0][0]]
        assert sorted(union) == sorted(global_batch)
        assert all(len(mb) == bs for _, micros in step_batches for mb in micros)


def test_one_rank_equals_two_ranks_global_batch():
    """The same global batch whatever the split: 1 rank x 2 samples == 2 ranks x 1 sample."""
    one = _sampler(world=1, bs=2)
    two = [_sampler(rank=r, world=2, bs=1) for r in range(2)]
    assert one.global_order(0) == two[0].global_order(0) == two[1].global_order(0)


def test_length_grouping_sorts_within_mega_batches():
    s = _sampler(n=200, bs=4, group=True)
    order = s.global_order(0)
    lengths = s.lengths
    # inside a global batch lengths are non-increasing (sorted mega-batch cut into pieces)
    for batch in order:
        ls = lengths[batch].tolist()
        assert ls == sorted(ls, reverse=True)


def test_resume_start_step_yields_the_same_tail():
    s = _sampler(n=40, bs=2, accum=2)
    full = list(s.epoch_steps(1))
    tail = list(s.epoch_steps(1, start_step=3))
    assert full[3:] == tail


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_match_transformers(kind):
    from transformers import get_scheduler

    total, warm = 20, 4
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    hf = get_scheduler(kind if kind != "constant" else "constant_with_warmup", opt, num_warmup_steps=warm, num_training_steps=total)
    ours = LRSchedule(kind, warm, total)
    for step in range(total):
        assert ours.factor(step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        hf.step()


def test_warmup_rule():
    assert warmup_steps_for(100, 7, 0.5) == 7
    assert warmup_steps_for(100, 0, 0.03) == 3


def test_param_groups_decay_rule_and_scales():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    groups = build_param_groups(model.named_parameters(), lr=1e-3, weight_decay=0.05,
                                lr_scale=lambda n: (n.split(".")[0], 0.5 if n.startswith("0") else 1.0))
    by_name = {n: g for g in groups for n in g["names"]}
    assert "2.weight" not in by_name
    assert by_name["0.weight"]["weight_decay"] == 0.05 and by_name["0.weight"]["lr_scale"] == 0.5
    assert by_name["0.bias"]["weight_decay"] == 0.0
    assert by_name["1.weight"]["weight_decay"] == 0.0  # 1-D norm weight
    assert by_name["2.bias"]["lr"] == pytest.approx(1e-3)


def test_packs_respect_budget_and_cover_everything():
    from internvl_tune.data.batching import PackedBatchSampler

    lengths = [(i * 7919) % 900 + 20 for i in range(500)]
    s = PackedBatchSampler(lengths, max_tokens=1024, world_size=2, rank=0, grad_accum=2, seed=1, window=128)
    assert sorted(i for p in s.fixed_packs for i in p) == list(range(500))
    assert all(sum(lengths[i] for i in p) <= 1024 for p in s.fixed_packs)
    assert s.padding_waste() < 0.1  # best-fit-decreasing keeps packs full
    ranks = [PackedBatchSampler(lengths, 1024, 2, r, 2, 1, window=128) for r in range(2)]
    seen = [i for r in ranks for _, micros in r.epoch_steps(0) for p in micros for i in p]
    assert set(seen) == set(range(500))
    assert list(ranks[0].epoch_steps(3)) == list(ranks[0].epoch_steps(3))
    assert list(ranks[0].epoch_steps(3, 2)) == list(ranks[0].epoch_steps(3))[2:]


def test_packs_respect_tile_budget_and_oversized_samples():
    from internvl_tune.data.batching import PackedBatchSampler

    s = PackedBatchSampler([100, 100, 100, 5000], max_tokens=1000, world_size=1, rank=0, grad_accum=1, seed=0,
                           tiles=[3, 3, 3, 1], max_tiles=6)
    sizes = sorted(len(p) for p in s.fixed_packs)
    assert sizes == [1, 1, 2]  # the tile budget splits the three short samples; the long one stands alone


def test_global_batch_larger_than_the_dataset_wraps_around():
    s = _sampler(n=5, bs=4, world=2, accum=2)  # 16 per step from 5 samples
    order = s.global_order(0)
    assert len(order) == 1 and len(order[0]) == 16 and set(order[0]) == set(range(5))
