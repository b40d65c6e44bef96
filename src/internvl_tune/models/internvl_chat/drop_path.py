"""Stochastic depth for the native InternViT layers (the reference's ``drop_path_rate``).

transformers' ``InternVLVisionLayer`` has no drop path, so training with ``--drop_path_rate`` (0.1 in the reference's
InternVL2 fine-tuning scripts) swaps each layer's class for a subclass whose two residual branches are dropped per
sample. Parameters and their names stay the same; in eval mode the layer computes exactly what the parent does.
"""

from __future__ import annotations

import torch
from transformers.models.internvl.modeling_internvl import InternVLVisionLayer


def drop_path(x: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    """Zero whole samples of a residual branch with probability ``prob``, scaling the kept ones by 1/(1-prob)."""
    if prob == 0.0 or not training:
        return x
    keep = 1.0 - prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPathVisionLayer(InternVLVisionLayer):
    """``InternVLVisionLayer`` with stochastic depth on the attention and MLP branches."""

    drop_prob: float = 0.0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attention, _ = self.attention(self.layernorm_before(hidden_states))
        hidden_states = hidden_states + drop_path(self.lambda_1 * attention, self.drop_prob, self.training)
        mlp = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return hidden_states + drop_path(self.lambda_2 * mlp, self.drop_prob, self.training)


def set_drop_path(model, rate: float) -> None:
    """Give the ViT layers drop-path rates rising linearly from 0 to ``rate`` (the reference's decay rule)."""
    layers = model.model.vision_tower.encoder.layer
    for layer, prob in zip(layers, torch.linspace(0, rate, len(layers)).tolist()):
        if type(layer) is InternVLVisionLayer:
            layer.__class__ = DropPathVisionLayer  # same parameters, only forward differs
        layer.drop_prob = prob
