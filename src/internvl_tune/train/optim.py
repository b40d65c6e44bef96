"""AdamW with the reference's weight-decay rule and optional per-parameter lr scales (layer-wise decay)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from internvl_tune.models.common.quantize import num_weights


def fp32_master_weights(module: nn.Module) -> None:
    """Trainable parameters become fp32 (the master weights of mixed precision); frozen ones keep their dtype."""
    for p in module.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and 1-D tensors (norm weights, layer scales) get no weight decay, as in the reference."""
    return param.ndim <= 1 or name.endswith(".bias")


def build_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    lr_scale: Callable[[str], tuple[str, float]] | None = None,
) -> list[dict]:
    """Group trainable parameters by (lr scale, decay) so each group has one lr and one weight decay.

    Args:
        named_params: ``model.named_parameters()``; frozen ones are skipped.
        lr: peak learning rate.
        weight_decay: AdamW decay for matrices.
        lr_scale: optional ``name -> (group_tag, scale)``, e.g. layer-wise lr decay.

    Returns:
        Groups with ``params``, ``names``, ``peak_lr``, ``lr_scale``, ``weight_decay`` and ``name``.
    """
    groups: dict[str, dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        tag, scale = lr_scale(name) if lr_scale else ("all", 1.0)
        decay = not no_weight_decay(name, param)
        key = f"{tag}_{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(
            key,
            dict(name=key, params=[], names=[], peak_lr=lr, lr=lr * scale, lr_scale=scale,
                 weight_decay=weight_decay if decay else 0.0),
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_adamw(groups: list[dict], betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW over fp32 master parameters, fused (one kernel for all tensors, on CUDA and CPU alike).

    The fused kernel also skips a step on the device when ``optimizer.found_inf`` is set (``train/step.py``).
    """
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (a 4-bit weight counts once, though two share a byte)."""
    total = trainable = 0
    for p in model.parameters():
        total += num_weights(p)
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
