"""Stochastic depth (the reference's ``drop_path_rate``): one implementation for both InternViT variants.

``models/internvl_cg/intern_vit.py`` puts :class:`DropPath` modules in its layers; transformers' native
``InternVLVisionLayer`` (InternVL2) has none, so :func:`add_drop_path` swaps each layer's class for a subclass whose two
residual branches go through :func:`drop_path`. Parameters and their names stay the same; in eval mode the layers
compute exactly what they did before.
"""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    """Zero whole samples of a residual branch with probability ``prob``, scaling the kept ones by 1/(1-prob)."""
    if prob == 0.0 or not training:
        return x
    keep = 1.0 - prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def linear_rates(rate: float, n: int) -> list[float]:
    """Per-layer drop probabilities rising linearly from 0 to ``rate`` (the reference's rule)."""
    # on the CPU explicitly: the model may be built under a meta-device context
    return torch.linspace(0, rate, n, device="cpu").tolist()


class DropPath(nn.Module):
    """:func:`drop_path` as a module."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def add_drop_path(vision_layers: nn.ModuleList, rate: float) -> None:
    """Give transformers' InternVL vision layers drop-path rates rising linearly from 0 to ``rate``."""
    from transformers.models.internvl.modeling_internvl import InternVLVisionLayer

    class DropPathVisionLayer(InternVLVisionLayer):
        """``InternVLVisionLayer`` with stochastic depth on the attention and MLP branches."""

        drop_prob: float = 0.0

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            attention, _ = self.attention(self.layernorm_before(hidden_states))
            hidden_states = hidden_states + drop_path(self.lambda_1 * attention, self.drop_prob, self.training)
            mlp = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
            return hidden_states + drop_path(self.lambda_2 * mlp, self.drop_prob, self.training)

    for layer, prob in zip(vision_layers, linear_rates(rate, len(vision_layers))):
        if type(layer) is InternVLVisionLayer:
            layer.__class__ = DropPathVisionLayer  # same parameters, only forward differs
        layer.drop_prob = prob
