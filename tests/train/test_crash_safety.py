"""Crash safety: SIGTERM checkpoints and exits cleanly, a failed save keeps the previous checkpoint, non-finite
steps are skipped, counted, and stop the run past the limit."""

import errno
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from internvl_tune.data.batching import TensorBatch
from internvl_tune.dist import DistInfo
from internvl_tune.errors import UserError
from internvl_tune.train.checkpoint import Checkpointer, list_checkpoints
from internvl_tune.train.metrics import read_jsonl
from internvl_tune.train.optim import build_adamw, build_param_groups
from internvl_tune.train.schedule import LRSchedule
from internvl_tune.train.step import StepRunner

REPO = Path(__file__).resolve().parents[2]


def _toy():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.AdamW(build_param_groups(model.named_parameters(), 0.1, 0.0), lr=0.1)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import internvl_tune.train.checkpoint as ck_module

    model, opt = _toy()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ck = Checkpointer(tmp_path, DistInfo(), keep=2)
    ck.save(1, opt, {"note": "first"})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck_module, "save_file", disk_full)
    with pytest.raises(OSError):
        ck.save(2, opt, {"note": "second"})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]  # the partial one is not "complete"
    assert ck.resolve("auto").name == "checkpoint-1"
    fresh, fresh_opt = _toy()
    state = ck.load(ck.resolve("auto"), fresh_opt)
    assert state["note"] == "first" and torch.equal(fresh.weight, model.weight)


class _NaNAfter(torch.nn.Module):
    """forward(batch) -> weighted loss sum, NaN when the batch asks for it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, batch):
        loss = (self.w * batch.loss_weight).sum()
        return {"loss": loss * float("nan") if batch.poison else loss}


@dataclass
class _Batch(TensorBatch):
    loss_weight: torch.Tensor
    poison: bool
    work: int = 4

    @property
    def weight(self) -> float:
        return float(self.loss_weight.sum())


def _batch(poison: bool, weights=(1.0, 1.0, 1.0)) -> _Batch:
    return _Batch(torch.tensor(weights), poison)


def _runner(module):
    groups = build_param_groups(module.named_parameters(), 0.1, 0.0)
    return StepRunner(module, build_adamw(groups, (0.9, 0.999), 1e-8), LRSchedule("constant", 0, 10), DistInfo())


def test_non_finite_step_is_skipped_without_touching_the_weights_or_the_optimizer_state():
    module = _NaNAfter()
    runner = _runner(module)
    good = runner([_batch(False)], 0).result()
    assert good["finite"] and good["work"] == 4 and module.w.item() != 1.0
    before = module.w.detach().clone()
    state = {k: v.clone() for k, v in runner.optimizer.state[module.w].items()}
    bad = runner([_batch(True)], 1).result()
    assert not bad["finite"] and torch.equal(module.w.detach(), before)
    assert all(torch.equal(v, runner.optimizer.state[module.w][k]) for k, v in state.items())  # step count too
    assert module.w.grad is None  # the poisoned gradient was dropped
    assert runner([_batch(False)], 2).result()["finite"] and module.w.item() != before.item()


def test_no_supervised_token_stops_with_the_loss_is_zero_explanation():
    runner = _runner(_NaNAfter())
    with pytest.raises(UserError, match="loss is 0"):
        runner([_batch(False, weights=())], 0).result()


def _cli(model, meta, out, *extra):
    return [sys.executable, "-m", "internvl_tune.cli", "train", "--model_name_or_path", str(model),
            "--meta_path", str(meta), "--output_dir", str(out), "--conv_style", "Hermes-2", "--force_image_size", "56",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--dataloader_num_workers", "0",
            "--report_to", "none", "--grad_checkpoint", "False", "--freeze_backbone", "--max_steps", "8",
            "--save_steps", "100", *extra]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_cleanly_and_resumes_exactly(tiny_1b, tmp_path, subset_meta):
    meta = subset_meta(tmp_path, 8)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(_cli(tiny_1b, meta, tmp_path / "ref"), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = [r["loss"] for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    run = subprocess.Popen(_cli(tiny_1b, meta, tmp_path / "run"), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and run.poll() is None and not (log.exists() and len(read_jsonl(log)) >= 2):
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err[-2000:]
    assert "stopped by signal" in err and "stopped by signal" in (tmp_path / "run" / "train.log").read_text()
    saved = list_checkpoints(tmp_path / "run")
    assert saved, "SIGTERM must leave a checkpoint"
    stopped_at = int(saved[-1].name.split("-")[1])
    assert 2 <= stopped_at < 8
    resumed = subprocess.run(_cli(tiny_1b, meta, tmp_path / "run", "--resume_from_checkpoint", "auto"), env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["loss"] for r in read_jsonl(log) if "loss" in r] == reference
