"""Preference tuning (``--objective dpo|mpo``) of InternVL2 chat models: the training module and its recipe.

The reference model (``reference.py``): the policy with its LoRA adapters disabled, or a frozen copy.

Each micro-batch runs the reference (no grad), then the policy, on the same rows: chosen and rejected answers of a
pair, padded or packed, sharing one computation of the pair's image features (the reference repeats the pixels
for both rows; with ``--drop_path_rate`` it hence draws two drop-path masks where we draw one).
"""

from __future__ import annotations

import torch

from internvl_tune.data.config import DataConfig
from internvl_tune.data.preference import PreferenceCollator, PreferenceDataset
from internvl_tune.models.internvl_chat.loss import sample_log_prob_sums
from internvl_tune.models.internvl_chat.objectives.preference_loss import PreferenceArgs, RewardShift, preference_losses
from internvl_tune.models.internvl_chat.objectives.reference import ReferenceRecipe, ReferenceTrainModule
from internvl_tune.models.internvl_chat.recipe import ChatTrainModule, ModelArgs


class PreferenceTrainModule(ReferenceTrainModule):
    """``forward(batch: PreferenceBatch)`` -> the preference loss and its logged terms, summed over the pairs.

    Args:
        chat: the policy (``InternVLChat``), trainable flags and LoRA applied.
        args: resolved preference flags.
        all_reduce_sum: sums a tensor over ranks (for the bco_pair reward shift).
        reference: a frozen ``InternVLChat`` of the starting model, or None to use ``chat`` with its LoRA adapters
            disabled.
    """

    def __init__(self, chat, args: PreferenceArgs, all_reduce_sum, reference=None):
        super().__init__(chat, reference)
        self.args = args
        self.shift = RewardShift(all_reduce_sum) if "bco_pair" in args.losses else None

    def _log_probs(self, module: ChatTrainModule, batch) -> torch.Tensor:
        return sample_log_prob_sums(module.hidden_states(batch), module.model.lm_head.weight, batch.loss_index,
                                    batch.loss_target, batch.loss_sample, 2 * batch.pairs)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        with self.reference_model() as reference:
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


class PreferenceRecipe(ReferenceRecipe):
    """DPO / MPO on preference data for ``train/trainer.py``: :class:`ChatRecipe` with pairs, a reference model and
    the preference losses."""

    dataset_class, collator_class = PreferenceDataset, PreferenceCollator

    def __init__(self, model: ModelArgs, data: DataConfig, preference: PreferenceArgs, all_reduce_sum):
        super().__init__(model, data)
        self.preference = preference.resolve()
        self.name = self.objective = self.preference.objective
        self.all_reduce_sum = all_reduce_sum

    @classmethod
    def from_objective(cls, model: ModelArgs, data: DataConfig, args: PreferenceArgs, collectives) -> PreferenceRecipe:
        return cls(model, data, args, collectives.all_reduce_sum)

    def _training_module(self, chat, dtype: torch.dtype, weights: bool) -> PreferenceTrainModule:
        reference = self._reference_chat(chat, dtype, weights)
        return PreferenceTrainModule(chat, self.preference, self.all_reduce_sum, reference)

    def run_state(self) -> dict:
        """The training module's bco_pair reward shift (two numbers)."""
        return self.module.run_state()

    def load_run_state(self, state: dict) -> None:
        self.module.load_run_state(state)

    def describe(self) -> list[str]:
        """The chat plan lines, the objective with its weights, and how the reference model is held."""
        return super().describe() + [f"objective {self.preference.describe()}; {self.reference_line()}"]
