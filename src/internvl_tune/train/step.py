"""One optimizer step of decoder training: global-token loss normalisation, backward, clip, update."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from internvl_tune.dist import DistInfo, all_reduce_sum
from internvl_tune.errors import UserError
from internvl_tune.train.loss import token_weights
from internvl_tune.train.schedule import LRSchedule


def to_device(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a batch to ``device`` (non-blocking from pinned memory)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def sample_ids(batch: dict) -> torch.Tensor:
    """Per-token sample id: the packing collator provides it; with padding, one sample per row."""
    if "sample_ids" in batch:
        return batch["sample_ids"]
    b, length = batch["input_ids"].shape
    return torch.arange(b, device=batch["input_ids"].device)[:, None].expand(b, length)


@dataclass
class StepRunner:
    """Runs optimizer steps of a module whose ``forward(batch, mask, weights)`` returns a weighted loss sum."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    info: DistInfo
    loss_reduction: str = "token"
    max_grad_norm: float = 1.0

    def __call__(self, micro_batches: list[dict], step: int) -> dict:
        """Forward/backward over one global step's micro-batches, clip, update; returns the step's numbers.

        The loss is ``sum(w * ce) / sum(w)`` over every supervised token of the global batch (all micro-steps and
        ranks): each micro-step's sum is scaled by ``world_size / global weight`` because FSDP averages gradients
        over ranks. A step with a non-finite loss or gradient norm is not applied (``finite`` is False).
        """
        info = self.info
        prepared = []
        weight_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        for batch in micro_batches:
            batch = to_device(batch, info.device)
            mask, weights = token_weights(batch["labels"], sample_ids(batch), self.loss_reduction)
            weight_sum += weights.sum().double()
            prepared.append((batch, mask, weights))
        global_weight = all_reduce_sum(weight_sum)
        # stays on the device: no host sync before the backward passes are queued
        scale = (info.world_size / global_weight.clamp_min(1e-30)).float()
        loss_sum = torch.zeros((), device=info.device)
        tokens = torch.zeros((), dtype=torch.long, device=info.device)
        for batch, mask, weights in prepared:
            loss = self.module(batch, mask, weights)
            (loss * scale).backward()
            loss_sum += loss.detach()
            tokens += batch["attention_mask"].sum() if batch.get("attention_mask") is not None else batch["input_ids"].numel()
        params = [p for p in self.module.parameters() if p.requires_grad]
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, limit)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        totals = all_reduce_sum(torch.stack([loss_sum.double(), tokens.double(), global_weight]))
        loss_sum_value, token_count, weight_value = totals.tolist()  # the step's one host sync
        if weight_value == 0:
            raise UserError(
                f"step {step + 1}: the global batch has no supervised token (all labels are -100). This is the "
                f"'loss is 0' trap: check that --conv_style matches the model's template and that answers survive "
                f"--max_seq_length; run `internvl-tune data check` on the meta file"
            )
        loss_value = loss_sum_value / weight_value * info.world_size
        lr = self.schedule.apply(self.optimizer, step)
        finite = math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "grad_norm": float(grad_norm), "lr": lr, "tokens": int(token_count),
                "finite": finite}
