"""The reference model of objectives that stay close to the starting model (DPO / MPO; GRPO / GSPO with ``--beta``).

The reference is the model training starts from, frozen, and never a second copy when it can be avoided:

- **LoRA runs**: the policy with its adapters disabled (each peft layer's ``enable_adapters(False)``, what peft's
  ``disable_adapter()`` context does) and in eval mode, so one copy of the base weights serves both. Every trained
  parameter must then be a LoRA matrix (else the base is not the starting model); a clear error says so.
- **Full (or partial) fine-tuning**: a frozen copy of the whole model, built from the same checkpoint in the stored
  dtype, registered as the ``reference`` child: its blocks are sharded like the policy's on several ranks, it has no
  gradients, master weights or optimizer state, and the memory estimate counts it. Checkpoints leave it out (it is
  the base checkpoint) and the export drops it. (The InternVL reference loads this second copy for LoRA runs too.)

Compiled runs: the reference pass (no grad, eval mode, adapters off) is one more graph per compiled block, built on
the first step and reused (``tests/objectives/test_compile_graphs.py``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from internvl_tune.errors import UserError
from internvl_tune.models.common.lora import lora_modules
from internvl_tune.models.internvl_chat.recipe import ChatRecipe, ChatTrainModule

REFERENCE_PREFIX = "reference."


@contextmanager
def as_reference(module: nn.Module):
    """``module`` in eval mode (no dropout, no drop path) with every LoRA adapter disabled, restored on exit."""
    layers = [layer for _, layer in lora_modules(module)]
    was_training = module.training
    module.train(False)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        module.train(was_training)


class ReferenceTrainModule(ChatTrainModule):
    """A chat training module with a reference model: ``reference`` is a frozen ``InternVLChat`` of the starting model,
    or None to use this module with its LoRA adapters disabled."""

    def __init__(self, chat, reference=None):
        super().__init__(chat)
        self.reference = ChatTrainModule(reference) if reference is not None else None

    def blocks(self) -> list[nn.Module]:
        return super().blocks() + (self.reference.blocks() if self.reference is not None else [])

    @contextmanager
    def reference_model(self):
        """The module that computes the reference's outputs: no gradients, eval mode, adapters off."""
        with torch.no_grad(), as_reference(self.reference if self.reference is not None else self) as reference:
            yield reference


def _trained_outside_lora(chat) -> list[str]:
    from internvl_tune.models.internvl_chat.lora import is_lora_name

    return [n for n, p in chat.model.named_parameters() if p.requires_grad and not is_lora_name(n)]


class ReferenceRecipe(ChatRecipe):
    """A :class:`ChatRecipe` whose objective compares the policy with the starting model (see the module docstring)."""

    objective = "sft"  # the --objective name, for messages

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference_params, self.reference_dtype = 0, None

    def _reference_chat(self, chat, dtype: torch.dtype, weights: bool):
        """The frozen copy for a full run, None for LoRA (after checking that only LoRA matrices train)."""
        from internvl_tune.models.internvl_chat.lora import has_lora

        if has_lora(chat):
            others = _trained_outside_lora(chat)
            if others:
                raise UserError(
                    f"--objective {self.objective} with LoRA uses the base model (adapters disabled) as the "
                    f"reference, so only LoRA matrices may train, but {len(others)} other tensors do (e.g. "
                    f"{others[0]}): freeze them (--freeze_mlp True, --freeze_backbone True, no --unfreeze_lm_head / "
                    f"--unfreeze_vit_layers), or train without LoRA (the reference is then a frozen copy)")
            return None
        reference = self._load_chat(dtype, weights)
        reference.model.requires_grad_(False)
        self.reference_params = sum(p.numel() for p in reference.model.parameters())
        self.reference_dtype = str(dtype).removeprefix("torch.")
        return reference

    def reference_line(self) -> str:
        """How the reference model is held, for the plan."""
        if self.reference_params:
            return (f"reference model: a frozen copy of {self.args.model_name_or_path} "
                    f"({self.reference_params / 1e6:.2f}M parameters in {self.reference_dtype}, no gradients or "
                    f"optimizer state; counted in the memory estimate's model states)")
        return "reference model: the model with its LoRA adapters disabled (no second copy)"

    def export(self, state: dict[str, torch.Tensor], output_dir: Path) -> None:
        """The policy's final model (the reference copy is left out)."""
        super().export({k: v for k, v in state.items() if not k.startswith(REFERENCE_PREFIX)}, output_dir)
