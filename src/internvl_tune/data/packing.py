"""Packing: several samples in one row of a token budget, each attending only to itself.

Three pieces that only work together, so they live together:

- :class:`PackedBatchSampler` decides which samples share a row (best-fit-decreasing bins, deterministic per seed);
- :func:`pack_rows` concatenates them into one row whose ``position_ids`` restart at 0 for every sample;
- :func:`cu_seqlens_from_positions` turns those positions into the cumulative sample lengths that per-sample
  (varlen) attention needs (``models/common/varlen_attention.py``).

``data/batch.py``'s ``ChatCollator`` calls the last two; the loss keeps predictions inside their own sample through
the row's ``sample_index``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch


class PackedBatchSampler:
    """Yields, per optimizer step, this rank's ``grad_accum`` packs (lists of dataset indices).

    The packs are built once (seeded shuffle, then best-fit-decreasing bin packing inside windows of ``window``
    samples, so packs mix lengths yet stay full); every epoch visits them in a new seeded order. Each optimizer step
    takes ``world_size x grad_accum`` packs. A sample longer than the budget gets a pack of its own.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        world_size: int,
        rank: int,
        grad_accum: int,
        seed: int,
        tiles: Sequence[int] | None = None,
        max_tiles: int | None = None,
        window: int = 4096,
    ):
        if len(lengths) == 0:
            raise ValueError("the dataset is empty")
        self.lengths = [int(x) for x in lengths]
        self.tiles = [int(x) for x in tiles] if tiles is not None else [0] * len(self.lengths)
        self.max_tokens, self.max_tiles = max_tokens, max_tiles
        self.world_size, self.rank, self.grad_accum, self.seed = world_size, rank, grad_accum, seed
        self.packs_per_step = world_size * grad_accum
        self.fixed_packs = self._build(window)

    def _build(self, window: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        packs: list[list[int]] = []
        for start in range(0, len(perm), window):
            items = sorted(perm[start : start + window], key=lambda i: -self.lengths[i])
            free: list[tuple[int, int]] = []  # (free tokens, pack index), kept sorted for best fit
            for i in items:
                need = self.lengths[i]
                pos = bisect.bisect_left(free, (need, -1))
                placed = False
                if pos < len(free):
                    room, b = free[pos]
                    pack_tiles = sum(self.tiles[j] for j in packs[b])
                    if self.max_tiles is None or pack_tiles + self.tiles[i] <= self.max_tiles:
                        packs[b].append(i)
                        free.pop(pos)
                        bisect.insort(free, (room - need, b))
                        placed = True
                if not placed:
                    packs.append([i])
                    bisect.insort(free, (self.max_tokens - need, len(packs) - 1))
        return packs

    def packs(self, epoch: int) -> list[list[int]]:
        """All packs in the order of ``epoch``, the last step filled from the start (deterministic)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.fixed_packs), generator=g).tolist()
        packs = [self.fixed_packs[i] for i in order]
        fill = (-len(packs)) % self.packs_per_step  # may exceed len(packs) on a tiny dataset and many ranks
        return packs + [packs[i % len(packs)] for i in range(fill)]

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.fixed_packs) // self.packs_per_step)

    @property
    def global_batch(self) -> int:
        """Packs per optimizer step (all ranks and micro-steps)."""
        return self.packs_per_step

    def padding_waste(self) -> float:
        """Fraction of the packs' token budget left empty."""
        used = sum(self.lengths)
        return max(0.0, 1.0 - used / (len(self.fixed_packs) * self.max_tokens))

    def epoch_steps(self, epoch: int, start_step: int = 0):
        """Yield ``(step_in_epoch, micro_batches)`` for this rank, from ``start_step`` on."""
        packs = self.packs(epoch)
        for step in range(start_step, self.steps_per_epoch):
            base = step * self.packs_per_step
            yield step, [packs[base + micro * self.world_size + self.rank] for micro in range(self.grad_accum)]


def pack_rows(samples: list[dict]) -> dict:
    """Concatenate samples into one row: ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 for each
    sample) and ``sample_index``, each [1, total tokens]. A packed row has no padding and no attention mask."""
    return {
        "input_ids": torch.cat([s["input_ids"] for s in samples])[None],
        "labels": torch.cat([s["labels"] for s in samples])[None],
        "position_ids": torch.cat([torch.arange(len(s["input_ids"])) for s in samples])[None],
        "sample_index": torch.cat([torch.full((len(s["input_ids"]),), i) for i, s in enumerate(samples)])[None],
    }


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sample lengths (int32) and the longest sample of a packed row [1, L] whose positions restart at 0."""
    starts = (position_ids[0] == 0).nonzero().flatten()
    total = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
