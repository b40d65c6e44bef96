"""Preference tuning (``--objective dpo|mpo``) of InternVL2 chat models: the training module and its recipe.

The reference model is the model training starts from, frozen, and never a second copy when it can be avoided:

- **LoRA runs**: the policy with its adapters disabled (each peft layer's ``enable_adapters(False)``, what peft's
  ``disable_adapter()`` context does) and in eval mode, so one copy of the base weights serves both. Every trained
  parameter must then be a LoRA matrix (else the base is not the starting model); a clear error says so.
- **Full (or partial) fine-tuning**: a frozen copy of the whole model, built from the same checkpoint in the stored
  dtype, registered as the ``reference`` child: its blocks are sharded like the policy's on several ranks, it has no
  gradients, master weights or optimizer state, and the memory estimate counts it. Checkpoints leave it out (it is
  the base checkpoint) and the export drops it. (The reference loads this second copy for LoRA runs too.)

Each micro-batch runs the reference (no grad), then the policy, on the same rows: chosen and rejected answers of a
pair, padded or packed, sharing one computation of the pair's image features (the reference repeats the pixels
for both rows; with ``--drop_path_rate`` it hence draws two drop-path masks where we draw one).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from internvl_tune.data.config import DataConfig
from internvl_tune.data.preference import PreferenceCollator, PreferenceDataset
from internvl_tune.errors import UserError
from internvl_tune.models.common.lora import lora_modules
from internvl_tune.models.internvl_chat.loss import sample_log_prob_sums
from internvl_tune.models.internvl_chat.objectives.preference_loss import PreferenceArgs, RewardShift, preference_losses
from internvl_tune.models.internvl_chat.recipe import ChatRecipe, ChatTrainModule, ModelArgs

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


class PreferenceTrainModule(ChatTrainModule):
    """``forward(batch: PreferenceBatch)`` -> the preference loss and its logged terms, summed over the pairs.

    Args:
        chat: the policy (``InternVLChat``), trainable flags and LoRA applied.
        args: resolved preference flags.
        all_reduce_sum: sums a tensor over ranks (for the bco_pair reward shift).
        reference: a frozen ``InternVLChat`` of the starting model, or None to use ``chat`` with its LoRA adapters
            disabled.
    """

    def __init__(self, chat, args: PreferenceArgs, all_reduce_sum, reference=None):
        super().__init__(chat)
        self.args = args
        self.reference = ChatTrainModule(reference) if reference is not None else None
        self.shift = RewardShift(all_reduce_sum) if "bco_pair" in args.losses else None

    def blocks(self) -> list[nn.Module]:
        return super().blocks() + (self.reference.blocks() if self.reference is not None else [])

    def _log_probs(self, module: ChatTrainModule, batch) -> torch.Tensor:
        return sample_log_prob_sums(module.hidden_states(batch), module.model.lm_head.weight, batch.loss_index,
                                    batch.loss_target, batch.loss_sample, 2 * batch.pairs)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        with torch.no_grad(), as_reference(self.reference if self.reference is not None else self) as reference:
            reference_logps = self._log_probs(reference, batch)
        policy_logps = self._log_probs(self, batch)
        return preference_losses(policy_logps, reference_logps, batch.chosen_tokens, self.args, self.shift,
                                 update=self.training)

    def run_state(self) -> dict:
        """What a checkpoint must keep besides the trained tensors: the bco_pair reward shift."""
        return self.shift.state() if self.shift is not None else {}

    def load_run_state(self, state: dict) -> None:
        if self.shift is not None:
            self.shift.load_state(state, self.model.lm_head.weight.device)


def _trained_outside_lora(chat) -> list[str]:
    from internvl_tune.models.internvl_chat.lora import is_lora_name

    return [n for n, p in chat.model.named_parameters() if p.requires_grad and not is_lora_name(n)]


class PreferenceRecipe(ChatRecipe):
    """DPO / MPO on preference data for ``train/trainer.py``: :class:`ChatRecipe` with pairs, a reference model and
    the preference losses."""

    dataset_class, collator_class = PreferenceDataset, PreferenceCollator

    def __init__(self, model: ModelArgs, data: DataConfig, preference: PreferenceArgs, all_reduce_sum):
        super().__init__(model, data)
        self.preference = preference.resolve()
        self.name = self.preference.objective
        self.all_reduce_sum = all_reduce_sum
        self.reference_params, self.reference_dtype = 0, None

    @classmethod
    def from_objective(cls, model: ModelArgs, data: DataConfig, args: PreferenceArgs, collectives) -> PreferenceRecipe:
        return cls(model, data, args, collectives.all_reduce_sum)

    def _training_module(self, chat, dtype: torch.dtype, weights: bool) -> PreferenceTrainModule:
        from internvl_tune.models.internvl_chat.lora import has_lora

        reference = None
        if has_lora(chat):
            others = _trained_outside_lora(chat)
            if others:
                raise UserError(
                    f"--objective {self.preference.objective} with LoRA uses the base model (adapters disabled) as "
                    f"the reference, so only LoRA matrices may train, but {len(others)} other tensors do (e.g. "
                    f"{others[0]}): freeze them (--freeze_mlp True, --freeze_backbone True, no --unfreeze_lm_head / "
                    f"--unfreeze_vit_layers), or train without LoRA (the reference is then a frozen copy)")
        else:
            reference = self._load_chat(dtype, weights)
            reference.model.requires_grad_(False)
            self.reference_params = sum(p.numel() for p in reference.model.parameters())
            self.reference_dtype = str(dtype).removeprefix("torch.")
        return PreferenceTrainModule(chat, self.preference, self.all_reduce_sum, reference)

    def run_state(self) -> dict:
        """The training module's bco_pair reward shift (two numbers)."""
        return self.module.run_state()

    def load_run_state(self, state: dict) -> None:
        self.module.load_run_state(state)

    def describe(self) -> list[str]:
        """The chat plan lines, the objective with its weights, and how the reference model is held."""
        if self.reference_params:
            held = (f"a frozen copy of {self.args.model_name_or_path} ({self.reference_params / 1e6:.2f}M parameters "
                    f"in {self.reference_dtype}, no gradients or optimizer state; counted in the memory estimate's "
                    f"model states)")
        else:
            held = "the model with its LoRA adapters disabled (no second copy)"
        return super().describe() + [f"objective {self.preference.describe()}; reference model: {held}"]

    def export(self, state: dict[str, torch.Tensor], output_dir: Path) -> None:
        """The policy's final model (the reference copy is left out)."""
        super().export({k: v for k, v in state.items() if not k.startswith(REFERENCE_PREFIX)}, output_dir)
