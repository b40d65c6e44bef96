"""The contract between a model family and the one trainer (``train/trainer.py``): :class:`Recipe`.

A recipe says what the trainer cannot know: how to build the training module and its data, how to describe and
export the run. Its required parts have no body; its optional hooks have a default body here, so a recipe that
subclasses :class:`Recipe` gets them, and the trainer calls every hook unconditionally (no ``hasattr``):

| hook              | when the trainer calls it                       | default          | overridden by          |
|-------------------|-------------------------------------------------|------------------|------------------------|
| ``param_groups_scale`` | building the optimizer                     | one lr for all   | InternVL-C/G (layer decay) |
| ``memory_shape``  | the plan's memory estimate, ``--grad_checkpoint auto`` | None (no estimate) | chat                  |
| ``run_state`` / ``load_run_state`` | saving / resuming a checkpoint | nothing to keep  | DPO/MPO (reward shift), GRPO (rollout) |
| ``prepare_step``  | before each optimizer step, on its micro-batches | the batches as they are | GRPO (rollouts)   |
| ``data_summary``  | writing the run report's data table (rank 0)   | None (no table)  | chat, InternVL-C/G     |
| ``generate_eval`` | ``--eval_generate`` at each evaluation          | refused          | chat                   |

The train set ``build_data`` returns has ``set_epoch(epoch)``: the trainer calls it at the start of every epoch, so
per-sample random choices depend on ``(seed, epoch, index)`` only and a resumed run sees the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class StepContext:
    """What :meth:`Recipe.prepare_step` knows of the step it prepares.

    Attributes:
        step: optimizer steps taken before this one (the step's number is ``step + 1``).
        epoch: the epoch the step belongs to.
        logged: this step's metrics row is written (``--logging_steps``), so samples worth showing may be too.
        output_dir: the run directory.
        is_main: this process is rank 0 (the one that writes files).
    """

    step: int
    epoch: int
    logged: bool
    output_dir: Path
    is_main: bool


@dataclass
class PreparedStep:
    """The micro-batches an optimizer step trains on, and numbers the step's metrics row gets besides the loss terms
    (already global over ranks; e.g. the rollout's mean reward)."""

    batches: list
    logs: dict[str, float] = field(default_factory=dict)


class Recipe(Protocol):
    """What a model family gives the trainer (see the module docstring for the optional hooks)."""

    name: str  # progress-bar label
    unit: str  # what throughput counts: "tokens" or "samples"
    grad_checkpoint: str  # the family's --grad_checkpoint value

    def build_module(self, dtype: torch.dtype, weights: bool = True, device: torch.device | str = "cpu") -> nn.Module:
        """The training module (``forward(batch) -> {"loss": ...}``, ``blocks()``), trainable flags applied; on the
        CPU, or where it may load straight onto the run's ``device`` (4-bit weights are quantized there)."""

    def build_data(self, seed: int, rank: int, world_size: int, per_device_batch: int, grad_accum: int) -> tuple:
        """``(train_set, val_set or None, collate, sampler)``; the train set has ``set_epoch(epoch)``."""

    def describe(self) -> list[str]:
        """The recipe's lines of the run plan."""

    def export(self, state: dict[str, torch.Tensor], output_dir: Path) -> None:
        """Write the final model from the gathered state of the training module (rank 0)."""

    # ---- optional hooks (defaults) ------------------------------------------------------------------------

    def param_groups_scale(self):
        """An lr-scale function of parameter names (layer-wise decay), or None for one learning rate."""
        return None

    def memory_shape(self, per_device_batch: int) -> dict | None:
        """The LLM shape for the memory estimate (``train/memory.py``), or None when there is no estimate."""
        return None

    def data_summary(self) -> dict | None:
        """The run report's data table: ``{"samples", "datasets", "kinds", "tiles", "token_histogram"}`` (any may be
        missing), or None."""
        return None

    def generate_eval(self, samples: int, max_new_tokens: int, rank: int, world_size: int, gather) -> tuple:
        """``--eval_generate``: answers for ``samples`` validation samples and their scores, ``(means, rows)`` on
        rank 0; called on every rank, only for runs with a validation set."""
        from internvl_tune.errors import UserError

        raise UserError(f"--eval_generate is not available for {self.name} runs: drop it")

    def checkpoint_saved(self, path: Path) -> None:
        """Rank 0, once ``checkpoint-N`` is complete: write what the family adds to a checkpoint (a LoRA run's
        adapter, as the transformers Trainer writes one into every checkpoint), or nothing."""

    def run_state(self) -> dict:
        """What a checkpoint must keep besides the trained tensors, optimizer and RNG states, as JSON values.

        Called on every rank (it may gather over ranks); rank 0's answer is saved in ``trainer_state.json``.
        """
        return {}

    def load_run_state(self, state: dict) -> None:
        """Restore what :meth:`run_state` returned (every rank gets rank 0's saved answer)."""

    def prepare_step(self, module: nn.Module, batches: list, context: StepContext) -> PreparedStep:
        """Turn the data loader's micro-batches of one optimizer step into the batches the step trains on.

        Online objectives generate here with the current policy (``module``, sharded and compiled as it trains):
        GRPO turns prompts into scored completions. Called on every rank, in step order, in training mode.
        """
        return PreparedStep(batches)
