"""Honest speed ratios: our loop and a plain one timed in alternation, in one process, with their spread.

A single timed run of each loop is not a measurement of a ratio: the plain transformers + peft loop made 2,756,
2,780 and 3,841 tokens/s in three runs on one H100 (issue 26), so a ratio from one run of each can be off by 40 %.
Here, after each loop's warm-up, the timed repeats alternate (ours, plain, ours, plain, ...) in one process, each
repeat of the plain loop running exactly the samples of the repeat of ours before it (batch 1 instead of packed
rows), and every number is reported as the median with its min-max over the repeats.

A loop is anything with ``prepare(packs)``, ``warm(packs)`` and ``run(packs) -> Repeat``, where ``packs`` are lists of sample indices:
our trainer's step takes one pack per step, a plain loop takes the same samples one at a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from internvl_tune.bench.common import sync

MIN_REPEATS = 3


@dataclass
class Repeat:
    """One timed repeat of a loop: the work it did, how long it took, and what it left behind."""

    tokens: int
    seconds: float
    flops: float = 0.0
    loss: float = float("nan")  # the last step's loss
    peak_gib: float = 0.0  # the loop's own peak (other loops' resident memory taken out); 0 on the CPU
    samples: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


class Loop(Protocol):
    name: str

    def prepare(self, packs: list[list[int]]) -> None: ...  # collate / materialize beforehand, untimed

    def warm(self, packs: list[list[int]]) -> None: ...

    def run(self, packs: list[list[int]]) -> Repeat: ...


@dataclass
class MemoryWatch:
    """A loop's own peak GPU memory while other loops stay resident in the same process.

    ``resident`` is what the loop holds between its steps (weights, optimizer state): the memory its set-up and its
    warm-up leave allocated, each wrapped in :meth:`holding` (loops are built and warmed one after the other, so
    only their own allocations happen inside). During a repeat, everything allocated beyond it belongs to the other
    loops and is taken out of the peak.
    """

    device: torch.device
    resident: int = 0
    others: int = 0

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    @contextmanager
    def holding(self):
        """What is allocated inside and still allocated after stays with this loop."""
        before = self._allocated()
        yield
        sync(self.device)
        self.resident += self._allocated() - before

    def begin(self) -> None:
        if self.device.type == "cuda":
            self.others = self._allocated() - self.resident
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        return (torch.cuda.max_memory_allocated(self.device) - self.others) / 2**30


def timed(device: torch.device, fn: Callable[[], tuple[int, float, float, int]], memory: MemoryWatch) -> Repeat:
    """Run ``fn`` (returning tokens, flops, last loss, samples) between two syncs; the Repeat it makes."""
    memory.begin()
    sync(device)
    start = time.perf_counter()
    tokens, flops, loss, samples = fn()
    sync(device)
    seconds = time.perf_counter() - start
    return Repeat(tokens, seconds, flops, loss, memory.peak_gib(), samples)


@dataclass
class Spread:
    """Median and min-max of a list of values."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))


@dataclass
class LoopStats:
    """A loop's repeats and their medians: tokens/s, TFLOP/s, MFU (when the matmul peak is known), peak memory."""

    name: str
    repeats: list[Repeat] = field(default_factory=list)

    def summary(self, matmul_peak_tflops: float | None = None) -> dict:
        tps = Spread.of([r.tokens_per_s for r in self.repeats])
        out = {"variant": self.name, "repeats": len(self.repeats), "tokens_per_s": tps.median,
               "tokens_per_s_min": tps.min, "tokens_per_s_max": tps.max,
               "tflops": statistics.median(r.flops / r.seconds / 1e12 for r in self.repeats),
               "peak_gib": max(r.peak_gib for r in self.repeats), "loss_last": self.repeats[-1].loss,
               "seconds": [r.seconds for r in self.repeats]}
        if matmul_peak_tflops:
            out["mfu"] = out["tflops"] / matmul_peak_tflops
        return out


def ratio(ours: dict, plain: dict) -> dict:
    """``x_plain``: the ratio of the two median tokens/s; its range: slowest ours over fastest plain to fastest ours
    over slowest plain (every ratio the repeats allow)."""
    return {"x_plain": ours["tokens_per_s"] / plain["tokens_per_s"],
            "x_plain_min": ours["tokens_per_s_min"] / plain["tokens_per_s_max"],
            "x_plain_max": ours["tokens_per_s_max"] / plain["tokens_per_s_min"]}


def flatten(packs: list[list[int]]) -> list[list[int]]:
    """The samples of ``packs`` one at a time (batch 1), in order: a plain loop's steps over the same samples."""
    return [[i] for pack in packs for i in pack]


def alternate(loops: list[Loop], warm: list[list[int]], repeats: list[list[list[int]]],
              deadline: float | None = None, on_repeat: Callable[[dict[str, LoopStats]], None] | None = None,
              on_warm: Callable[[], None] | None = None) -> dict[str, LoopStats]:
    """Warm every loop, then time ``len(repeats)`` rounds in which each loop runs that round's packs in turn.

    Args:
        loops: ours first, then the baselines; each runs the same samples in every round.
        warm: packs each loop runs untimed first (compilation, allocator and cuBLAS warm-up).
        repeats: the packs of each round.
        deadline: a ``time.monotonic()`` after which no new round starts once ``MIN_REPEATS`` are done (nor one
            that would end past it, judging by the last round's length).
        on_repeat: called with the stats so far after every round (to save partial results).
        on_warm: called once every loop is warm, before the first timed round.
    """
    stats = {loop.name: LoopStats(loop.name) for loop in loops}
    for loop in loops:
        loop.prepare(warm + [pack for packs in repeats for pack in packs])
        loop.warm(warm)
    if on_warm is not None:
        on_warm()
    last = 0.0
    for i, packs in enumerate(repeats):
        if deadline is not None and i >= MIN_REPEATS and time.monotonic() + last > deadline:
            break
        begin = time.monotonic()
        for loop in loops:
            stats[loop.name].repeats.append(loop.run(packs))
        last = time.monotonic() - begin
        if on_repeat is not None:
            on_repeat(stats)
    return stats


def schedule(packs: list[list[int]], warmup: int, steps: int, repeats: int) -> tuple[list, list[list]]:
    """``(warm-up packs, packs of each round)``: ``warmup`` packs, then ``repeats`` rounds of ``steps`` packs, taken
    in order from ``packs`` and cycling through them when there are too few."""
    need = warmup + steps * repeats
    cycled = [packs[i % len(packs)] for i in range(need)]
    return cycled[:warmup], [cycled[warmup + r * steps: warmup + (r + 1) * steps] for r in range(repeats)]

