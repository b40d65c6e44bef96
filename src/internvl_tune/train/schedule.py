"""Learning-rate schedules with linear warm-up (the transformers Trainer's cosine / linear / constant shapes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of each group's peak lr at an optimizer step; stateless, so resume needs only the step."""

    kind: str
    warmup_steps: int
    total_steps: int

    def factor(self, step: int) -> float:
        """lr multiplier for the update made at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:  # same as transformers: the first update runs at lr 0
            return step / max(1, self.warmup_steps)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        if self.kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        raise ValueError(f"unknown lr schedule {self.kind!r}")

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr to ``peak_lr * lr_scale * factor(step)``; returns the first group's lr."""
        f = self.factor(step)
        for group in optimizer.param_groups:
            peak = group.setdefault("peak_lr", group["lr"])  # groups not built by build_param_groups
            group["lr"] = peak * group.get("lr_scale", 1.0) * f
        return optimizer.param_groups[0]["lr"]


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """The reference rule: explicit warm-up steps win, else ``ceil(ratio * total)``."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)
