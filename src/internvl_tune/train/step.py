"""One optimizer step: global loss normalisation, backward, clip, update, with no host sync.

The training module's ``forward(batch)`` returns ``{"loss": ..., other terms...}``: sums over the micro-batch whose
normaliser is the batch's ``weight`` (chat: the sum of its supervised tokens' weights; retrieval: 1, each micro-step
being a mean). The step's loss is ``sum of losses / sum of weights`` over the *global* batch (every micro-step, every
rank), so results do not depend on how the global batch is split across GPUs and accumulation steps.

The step is queued on the GPU without waiting for it: the weights come from the CPU batch, a step with a non-finite
loss or gradient is skipped by the fused AdamW kernel itself (``found_inf``), and the step's numbers come back
through a non-blocking copy that :class:`PendingStep` reads later, so the host prepares step ``n + 1`` while the GPU
still runs step ``n``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from internvl_tune.dist import DistInfo, all_reduce_sum
from internvl_tune.errors import UserError
from internvl_tune.train.schedule import LRSchedule


class StepClock:
    """When steps finished: a CUDA event recorded after each step, or the host clock on the CPU.

    Step throughput is work over the time between two finish marks. Reading the host clock when a queued step's
    numbers are read back would be wrong: the host may reach that read long after the step ended (or long before
    the next one does), so the last step of a run looked 30x faster than the others. Events are timestamps on the
    GPU's own timeline.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        """A finish mark for the work queued so far."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        """Seconds between two marks (``end`` must have been reached)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start


class PendingStep:
    """The numbers of a queued step; :meth:`result` waits for that step only (not for later ones)."""

    def __init__(self, names: list[str], values: torch.Tensor, step: int, lr: float, clock: StepClock,
                 logs: dict[str, float] | None = None):
        self.names, self.step, self.lr, self.logs = names, step, lr, logs or {}
        self._values = values.to("cpu", non_blocking=True) if values.is_cuda else values
        self.end = clock.mark()  # after the copy: once the mark is reached, the values are on the host

    def result(self) -> dict:
        """The step's terms (``loss`` ...), the recipe's logs of the step, ``grad_norm``, ``lr``, ``work`` (global),
        ``finite`` and ``end`` (its finish mark)."""
        if isinstance(self.end, torch.cuda.Event):
            self.end.synchronize()
        *terms, grad_norm, finite, work, weight = self._values.tolist()
        if weight == 0:
            raise UserError(
                f"step {self.step + 1}: the global batch has no supervised token (all labels are -100). This is the "
                f"'loss is 0' trap: check that --conv_style matches the model's template and that answers survive "
                f"--max_seq_length; run `internvl-tune data check` on the meta file"
            )
        return {**dict(zip(self.names, terms)), **self.logs, "grad_norm": grad_norm, "lr": self.lr, "work": int(work),
                "finite": bool(finite), "end": self.end}


@dataclass
class StepRunner:
    """Runs optimizer steps of a training module (see the module docstring for its contract).

    The optimizer must be a fused AdamW (``train.optim.build_adamw``): it skips a non-finite step on the device.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    info: DistInfo
    max_grad_norm: float = 1.0

    def __post_init__(self):
        self.clock = StepClock(self.info.device)
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def __call__(self, micro_batches: list, step: int, logs: dict[str, float] | None = None) -> PendingStep:
        """Queue forward/backward over one global step's micro-batches, clip and update; ``logs`` (numbers the
        recipe computed for this step, already global) come back with the step's result.

        Each micro-step's sums are scaled by ``world_size / global weight`` because FSDP averages gradients over
        ranks. A step with a non-finite loss or gradient norm leaves the weights and optimizer state as they were
        (``finite`` is False in its result).
        """
        device = self.info.device
        local = sum(b.weight for b in micro_batches)  # CPU floats: no sync
        work = sum(b.work for b in micro_batches)
        global_weight = all_reduce_sum(torch.full((), local, dtype=torch.float64, device=device))
        scale = (self.info.world_size / global_weight.clamp_min(1e-30)).float()
        names, sums = None, None
        for batch in micro_batches:
            out = self.module(batch.to(device))
            (out["loss"] * scale).backward()
            names = names or list(out)
            terms = torch.stack([out[k].detach().double().reshape(()) for k in names])
            sums = terms if sums is None else sums + terms
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, limit)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        grad_norm = grad_norm.to(device)  # (offloaded gradients: their norm was taken on the CPU)
        totals = all_reduce_sum(torch.cat([sums, torch.full((1,), work, dtype=torch.float64, device=device)]))
        terms = totals[:-1] / global_weight
        finite = torch.isfinite(terms[0]) & torch.isfinite(grad_norm)
        lr = self.schedule.apply(self.optimizer, step)
        # read by the fused AdamW kernel (as GradScaler uses it), on its parameters' device. Offloaded parameters
        # step on the CPU: a blocking copy there (torch's own would be non-blocking, read before it lands)
        self.optimizer.found_inf = (~finite).float().to(self.params[0].device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = torch.cat([terms, grad_norm.double().reshape(1), finite.double().reshape(1), totals[-1:],
                            global_weight.reshape(1)])
        return PendingStep(names, values, step, lr, self.clock, logs)
