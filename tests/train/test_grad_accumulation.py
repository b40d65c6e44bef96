"""A global batch gives one gradient however it is split: into micro-batches (gradient accumulation) or over ranks.

The reference normalises the loss by the supervised tokens of the whole global batch (``loss_reduction_all_gather``
and its token reduction), so micro-batches with more answer tokens weigh more. Normalising each micro-batch by its own
weight instead is a classic bug that equal-sized batches hide: here the micro-batches always differ in weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reference_fixtures import RecordGradients, checkpoint

from internvl_tune.data.batching import TensorBatch
from internvl_tune.dist import DistInfo
from internvl_tune.train.schedule import LRSchedule
from internvl_tune.train.step import StepRunner


class _Regression(torch.nn.Module):
    """forward(batch) -> the weighted squared-error sum of the micro-batch (its normaliser is ``batch.weight``)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

    def forward(self, batch):
        residual = batch.x @ self.w - batch.y
        return {"loss": (batch.loss_weight * residual**2).sum()}


@dataclass
class _Batch(TensorBatch):
    x: torch.Tensor
    y: torch.Tensor
    loss_weight: torch.Tensor
    work: int = 1

    @property
    def weight(self) -> float:
        return float(self.loss_weight.sum())


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_global_batch():
    """Two micro-batches of 1 and 3 supervised tokens. By hand, with w = (1, -2):
    tokens x = (1,0) y=0 | (0,1) y=0, (1,1) y=1, (2,0) y=0 -> residuals 1 | -2, -2, 2; the loss of the global batch is
    (1 + 4 + 4 + 4) / 4 = 3.25 and its gradient sum(2 r x) / 4 = ((2 + 0 - 4 + 8) / 4, (0 - 4 - 4 + 0) / 4)
    = (1.5, -2). (Each micro-batch normalised by its own weight would give ((2/1) + (4/3)) / 2, ... = (1.667, -2.667).)
    """
    first = _Batch(torch.tensor([[1.0, 0.0]]), torch.tensor([0.0]), torch.tensor([1.0]))
    second = _Batch(torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]), torch.tensor([0.0, 1.0, 0.0]),
                    torch.tensor([1.0, 1.0, 1.0]))
    module = _Regression()
    optimizer = RecordGradients(module.named_parameters())
    runner = StepRunner(module, optimizer, LRSchedule("constant", 0, 10), DistInfo(), max_grad_norm=0.0)
    result = runner([first, second], 0).result()
    assert result["loss"] == pytest.approx(3.25, abs=1e-6)
    assert result["grad_norm"] == pytest.approx((1.5**2 + 2.0**2) ** 0.5, abs=1e-6)
    torch.testing.assert_close(optimizer.grads[0]["w"], torch.tensor([1.5, -2.0]), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- the trainer, 1 and 2 processes
def _two_steps(model: str, meta: str, out: str, per_device: int, accum: int) -> list[tuple[float, float]]:
    """(loss, grad_norm) of two optimizer steps over global batches of 4 samples: full fine-tuning of a tiny model."""
    from train_helpers import run_chat

    from internvl_tune.data.config import DataConfig
    from internvl_tune.models.internvl_chat.recipe import ModelArgs
    from internvl_tune.train.config import RunConfig, TrainArgs
    from internvl_tune.train.metrics import read_jsonl

    cfg = RunConfig(
        model=ModelArgs(model_name_or_path=model, grad_checkpoint="False"),
        data=DataConfig(meta_path=meta, max_dynamic_patch=2, max_seq_length=1024),
        train=TrainArgs(output_dir=out, max_steps=2, per_device_train_batch_size=per_device,
                        gradient_accumulation_steps=accum, learning_rate=1e-3, lr_scheduler_type="constant",
                        logging_steps=1, save_steps=1000, dataloader_num_workers=0, report_to="none", seed=0,
                        device="cpu", torch_compile="False"))
    run_chat(cfg)
    return [(r["loss"], r["grad_norm"]) for r in read_jsonl(Path(out) / "metrics.jsonl") if "loss" in r]


def _close(a, b) -> bool:
    return all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def test_one_process_accumulating_two_and_two_processes_match_one_batch(tmp_path, subset_meta):
    """The same two global batches of 4 samples as one micro-batch, as 2 accumulated micro-batches of 2, and as one
    micro-batch of 2 on each of 2 gloo processes: the losses and gradient norms of both steps agree."""
    from train_helpers import spawn

    model = str(checkpoint("internvl2-1b"))  # a tiny checkpoint with a 524-token vocabulary: seconds per run
    meta = str(subset_meta(tmp_path, 4))
    whole = _two_steps(model, meta, str(tmp_path / "whole"), 4, 1)
    accumulated = _two_steps(model, meta, str(tmp_path / "accumulated"), 2, 2)
    two_ranks = spawn(2, _two_steps, model, meta, str(tmp_path / "ranks"), 2, 1)
    assert len(whole) == 2 and whole[0][1] > 0
    assert _close(accumulated, whole), (accumulated, whole)
    assert _close(two_ranks, whole), (two_ranks, whole)
