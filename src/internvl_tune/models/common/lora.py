"""LoRA layers of any model (peft's ``LoraLayer``): finding them and folding them into their base weights."""

from __future__ import annotations

from torch import nn


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every peft LoRA layer in ``model``."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def merge_lora_layers(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight and put the plain base layers back, in place."""
    for name, module in lora_modules(model):
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
