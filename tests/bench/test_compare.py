"""Honest ratios (bench/compare.py): loops alternate round by round on the same samples; medians and spreads."""

from __future__ import annotations

import pytest
import torch

from internvl_tune.bench.common import phase_flops, step_flops, synthetic_samples
from internvl_tune.bench.compare import MIN_REPEATS, Repeat, Spread, alternate, flatten, ratio, schedule
from internvl_tune.bench.plain import answer_log_probs
from internvl_tune.constants import IGNORE_INDEX


class FakeLoop:
    """A loop whose rounds take the seconds it is told, logging what it ran."""

    def __init__(self, name, seconds, log):
        self.name, self.seconds, self.log = name, list(seconds), log

    def prepare(self, packs):
        self.log.append((self.name, "prepare", len(packs)))

    def warm(self, packs):
        self.log.append((self.name, "warm", packs))

    def run(self, packs):
        self.log.append((self.name, "run", packs))
        return Repeat(tokens=1000, seconds=self.seconds.pop(0), loss=1.0)


def test_rounds_alternate_after_every_loop_is_warm():
    log = []
    ours, plain = FakeLoop("ours", [1, 2, 4], log), FakeLoop("plain", [10, 5, 8], log)
    warm, rounds = [[0, 1]], [[[2, 3]], [[4]], [[5, 6]]]
    stats = alternate([ours, plain], warm, rounds)
    assert [(name, what) for name, what, _ in log] == [
        ("ours", "prepare"), ("ours", "warm"), ("plain", "prepare"), ("plain", "warm"),
        ("ours", "run"), ("plain", "run"), ("ours", "run"), ("plain", "run"), ("ours", "run"), ("plain", "run")]
    assert [packs for name, what, packs in log if what == "run"] == [r for r in rounds for _ in range(2)]
    o, p = stats["ours"].summary(), stats["plain"].summary()
    # tokens/s of the rounds: ours 1000, 500, 250; plain 100, 200, 125
    assert (o["tokens_per_s"], o["tokens_per_s_min"], o["tokens_per_s_max"]) == (500, 250, 1000)
    assert (p["tokens_per_s"], p["tokens_per_s_min"], p["tokens_per_s_max"]) == (125, 100, 200)
    x = ratio(o, p)
    assert x == {"x_plain": 4.0, "x_plain_min": 250 / 200, "x_plain_max": 1000 / 100}


def test_a_deadline_stops_new_rounds_only_after_the_minimum():
    log = []
    loop = FakeLoop("ours", [1] * 6, log)
    stats = alternate([loop], [], [[[i]] for i in range(6)], deadline=0.0)  # long past
    assert len(stats["ours"].repeats) == MIN_REPEATS


def test_schedule_cycles_through_the_packs_and_plain_steps_take_their_samples():
    warm, rounds = schedule([[0, 1], [2], [3, 4, 5]], warmup=2, steps=2, repeats=2)
    assert warm == [[0, 1], [2]] and rounds == [[[3, 4, 5], [0, 1]], [[2], [3, 4, 5]]]
    assert flatten([[3, 4, 5], [0, 1]]) == [[3], [4], [5], [0], [1]]


def test_spread_of_an_even_count_takes_the_middle_two():
    assert Spread.of([4.0, 1.0, 2.0, 3.0]) == Spread(2.5, 1.0, 4.0, 4)


def test_phase_flops_split_the_step_flops():
    from types import SimpleNamespace

    counts = {"llm": 1000, "vit": 300, "proj": 50}
    text = SimpleNamespace(hidden_size=8, num_hidden_layers=2)
    samples = synthetic_samples(3, seed=1, tiles=(1, 2), text=(4, 9))
    forward, backward = phase_flops(counts, text, samples, lora=False)
    assert forward + backward == pytest.approx(step_flops(counts, text, samples))
    tokens = sum(s.tokens for s in samples)
    lora_forward, lora_backward = phase_flops(counts, text, samples, lora=True)
    assert lora_forward == forward and backward - lora_backward == 2 * 1000 * tokens + 2 * 2 * 50 * sum(
        s.tiles for s in samples) * 256


def test_answer_log_probs_sum_the_supervised_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, 6]])
    expected = [-torch.nn.functional.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=IGNORE_INDEX,
                                                   reduction="sum") for b in range(2)]
    assert torch.allclose(answer_log_probs(logits, labels), torch.stack(expected))


def test_each_loops_peak_leaves_out_the_other_loops_resident_memory(monkeypatch):
    """The GPU accounting of MemoryWatch on a made-up allocator: A built, B built, A warmed, B warmed (so A's
    warm-up happens while B's weights exist), then a round of A that allocates 5 more for a moment."""
    from internvl_tune.bench.compare import MemoryWatch

    gpu = {"now": 0, "peak": 0}

    def allocate(n):
        gpu["now"] += n
        gpu["peak"] = max(gpu["peak"], gpu["now"])

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: gpu["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: gpu["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: gpu.update(peak=gpu["now"]))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    a, b = MemoryWatch(torch.device("cuda")), MemoryWatch(torch.device("cuda"))
    for watch, n in ((a, 10 * 2**30), (b, 20 * 2**30), (a, 3 * 2**30), (b, 4 * 2**30)):
        with watch.holding():
            allocate(n)
    assert (a.resident, b.resident) == (13 * 2**30, 24 * 2**30)
    a.begin()
    allocate(5 * 2**30)
    allocate(-5 * 2**30)
    assert a.peak_gib() == 18.0  # its 13 resident + 5 for the step, not B's 24
    b.begin()
    allocate(2 * 2**30)
    assert b.peak_gib() == 26.0
