"""Deterministic, resumable batch sampling across ranks and gradient-accumulation micro-steps.

Every optimizer step consumes one *global batch* of ``per_device_batch x world_size x grad_accum`` samples. The
order of an epoch is a pure function of ``(seed, epoch)``, so resuming only needs the epoch and the number of
steps already taken: nothing is re-read or skipped sample by sample. (Packed rows have their own sampler,
``data/packing.py``.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class GlobalBatchSampler:
    """Yields, per optimizer step, this rank's ``grad_accum`` micro-batches (lists of dataset indices).

    With ``group_by_length`` the samples of an epoch are shuffled, cut into mega-batches of 8 global batches, and
    each mega-batch sorted by length (longest first) before being cut into global batches whose order is shuffled
    again; this keeps padding low while the order stays random, like the reference's length-grouped sampler.
    The last incomplete global batch is filled from the start of the epoch so every rank gets the same work.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        per_device_batch: int,
        world_size: int,
        rank: int,
        grad_accum: int,
        seed: int,
        group_by_length: bool = True,
    ):
        if len(lengths) == 0:
            raise ValueError("the dataset is empty")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.per_device_batch, self.world_size, self.rank = per_device_batch, world_size, rank
        self.grad_accum, self.seed, self.group_by_length = grad_accum, seed, group_by_length
        self.global_batch = per_device_batch * world_size * grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.global_batch)

    def global_order(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch`` (each a list of sample indices, rank-major within micro-steps)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g)
        need = self.steps_per_epoch * self.global_batch
        perm = perm[torch.arange(need) % len(perm)]  # wrap around; a global batch may exceed the dataset
        if self.group_by_length:
            mega = self.global_batch * 8
            chunks = []
            for start in range(0, len(perm), mega):
                chunk = perm[start : start + mega]
                chunks.append(chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)])
            perm = torch.cat(chunks)
        batches = perm.view(self.steps_per_epoch, self.global_batch)
        if self.group_by_length:
            batches = batches[torch.randperm(len(batches), generator=g)]
        return batches.tolist()

    def micro_batches(self, global_batch: list[int]) -> list[list[int]]:
        """This rank's ``grad_accum`` micro-batches out of one global batch."""
        b = self.per_device_batch
        out = []
        for micro in range(self.grad_accum):
            base = (micro * self.world_size + self.rank) * b
            out.append(global_batch[base : base + b])
        return out

    def epoch_steps(self, epoch: int, start_step: int = 0):
        """Yield ``(step_in_epoch, micro_batches)`` from ``start_step`` on."""
        order = self.global_order(epoch)
        for step in range(start_step, len(order)):
            yield step, self.micro_batches(order[step])
