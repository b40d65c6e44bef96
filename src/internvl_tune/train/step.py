"""One optimizer step of decoder training: global-token loss normalisation, backward, clip, update; no host sync.

The step is queued on the GPU without waiting for it: the batch's loss weights and token count come from the CPU
(``train/chat_batch.py``), a step with a non-finite loss or gradient is skipped by the fused AdamW kernel itself
(``found_inf``), and the step's numbers come back through a non-blocking copy that :class:`PendingStep` reads
later, so the host prepares step ``n + 1`` while the GPU still runs step ``n``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from internvl_tune.dist import DistInfo, all_reduce_sum
from internvl_tune.errors import UserError
from internvl_tune.train.schedule import LRSchedule


def to_device(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a batch to ``device`` (non-blocking from pinned memory)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class PendingStep:
    """The numbers of a queued step; :meth:`result` waits for that step only (not for later ones)."""

    def __init__(self, values: torch.Tensor, step: int, lr: float):
        self.step, self.lr = step, lr
        if values.is_cuda:
            self._values = values.to("cpu", non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:  # computed already
            self._values, self._ready, self._done_at = values, None, time.perf_counter()

    def result(self) -> dict:
        """``loss``, ``grad_norm``, ``lr``, ``tokens`` (global), ``work`` (= tokens), ``finite`` and ``done_at``
        (``time.perf_counter()`` when the step was seen finished) of the step."""
        if self._ready is not None:
            self._ready.synchronize()
            self._done_at = time.perf_counter()
        loss, grad_norm, finite, tokens, weight = self._values.tolist()
        if weight == 0:
            raise UserError(
                f"step {self.step + 1}: the global batch has no supervised token (all labels are -100). This is the "
                f"'loss is 0' trap: check that --conv_style matches the model's template and that answers survive "
                f"--max_seq_length; run `internvl-tune data check` on the meta file"
            )
        return {"loss": loss, "grad_norm": grad_norm, "lr": self.lr, "tokens": int(tokens), "work": int(tokens),
                "finite": bool(finite), "done_at": self._done_at}


@dataclass
class StepRunner:
    """Runs optimizer steps of a module whose ``forward(batch)`` returns the weighted loss sum of a micro-batch.

    Each CPU micro-batch carries ``loss_weight`` (the weights of its supervised tokens) and ``num_tokens``.
    The optimizer must be a fused AdamW (``train.optim.build_adamw``): it skips a non-finite step on the device.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    info: DistInfo
    max_grad_norm: float = 1.0

    def __call__(self, micro_batches: list[dict], step: int) -> PendingStep:
        """Queue forward/backward over one global step's micro-batches, clip and update.

        The loss is ``sum(w * ce) / sum(w)`` over every supervised token of the global batch (all micro-steps and
        ranks): each micro-step's sum is scaled by ``world_size / global weight`` because FSDP averages gradients
        over ranks. A step with a non-finite loss or gradient norm leaves the weights and optimizer state as they
        were (``finite`` is False in its result).
        """
        info, device = self.info, self.info.device
        local = [float(b["loss_weight"].sum()) for b in micro_batches]  # CPU tensors: no sync
        tokens = sum(b["num_tokens"] for b in micro_batches)
        global_weight = all_reduce_sum(torch.full((), sum(local), dtype=torch.float64, device=device))
        scale = (info.world_size / global_weight.clamp_min(1e-30)).float()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in micro_batches:
            loss = self.module(to_device(batch, device))
            (loss * scale).backward()
            loss_sum += loss.detach()
        params = [p for p in self.module.parameters() if p.requires_grad]
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, limit)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        totals = all_reduce_sum(torch.stack([loss_sum, torch.full_like(loss_sum, tokens)]))
        loss = totals[0] / global_weight
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        lr = self.schedule.apply(self.optimizer, step)
        self.optimizer.found_inf = (~finite).float()  # read by the fused AdamW kernel (as GradScaler uses it)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = torch.stack([loss, grad_norm.double(), finite.double(), totals[1], global_weight])
        return PendingStep(values, step, lr)
