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
from internvl_tune.errors import StorageError, UserError
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

    def disk_full(tensors, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ck_module, "save_safetensors", disk_full)
    with pytest.raises(StorageError) as info:
        ck.save(2, opt, {"note": "second"})
    # fp32 parameters and two AdamW moments (8 numbers each), a 0-d step count per parameter, the CPU RNG state
    needed = 8 * 4 * 3 + 2 * 4 + torch.get_rng_state().numel()
    assert str(info.value).startswith(f"cannot write checkpoint-2 to {tmp_path / 'checkpoint-2.partial'}: the disk "
                                      f"is full (needs {needed / 1024:.1f} KiB, ")
    assert "checkpoint-1 is intact: resume from it with --resume_from_checkpoint auto" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # the partial one is gone
    assert ck.resolve("auto").name == "checkpoint-1"
    fresh, fresh_opt = _toy()
    state = ck.load(ck.resolve("auto"), fresh_opt)
    assert state["note"] == "first" and torch.equal(fresh.weight, model.weight)


def test_a_really_full_disk_is_one_line(tmp_path):
    """A tmpfs too small for the checkpoint (root only): safetensors' own I/O error becomes the one-line error."""
    disk = tmp_path / "small"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs to make a small disk")
    try:
        model = torch.nn.Linear(100, 100)
        opt = torch.optim.AdamW(build_param_groups(model.named_parameters(), 0.1, 0.0), lr=0.1)
        model(torch.randn(2, 100)).sum().backward()
        opt.step()
        needed = (10_100 * 4 * 3 + 2 * 4 + torch.get_rng_state().numel()) / 1024  # weights, moments, steps, RNG
        with pytest.raises(StorageError, match=rf"cannot write checkpoint-1 to .*checkpoint-1.partial: the disk is "
                                               rf"full \(needs {needed:.1f} KiB, .* free there\) — free space there"):
            Checkpointer(disk, DistInfo()).save(1, opt, {})
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


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
    assert run.returncode == 128 + signal.SIGTERM, err[-2000:]  # 143: `train && merge-lora` stops here
    assert "stopped by SIGTERM at step" in err and "stopped by SIGTERM" in (tmp_path / "run" / "train.log").read_text()
    saved = list_checkpoints(tmp_path / "run")
    assert saved, "SIGTERM must leave a checkpoint"
    stopped_at = int(saved[-1].name.split("-")[1])
    assert 2 <= stopped_at < 8
    resumed = subprocess.run(_cli(tiny_1b, meta, tmp_path / "run", "--resume_from_checkpoint", "auto"), env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["loss"] for r in read_jsonl(log) if "loss" in r] == reference


# A driver that makes the first optimizer step slow (as compilation makes it on a GPU), says when it began, and
# in "break" mode fails it after the wait (as compilation fails when the signal also ended its compile workers).
SLOW_FIRST_STEP = """
import pathlib, sys, time
from internvl_tune.train import step
real = step.StepRunner.__call__
def slow_first(self, batches, n, *rest):
    if n == 0:
        pathlib.Path(sys.argv[1]).write_text("first step")
        time.sleep(3)
        if sys.argv[2] == "break":
            raise RuntimeError("SubprocException: a compile worker died")
    return real(self, batches, n, *rest)
step.StepRunner.__call__ = slow_first
from internvl_tune.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("sig, mode", [(signal.SIGINT, "finish"), pytest.param(signal.SIGTERM, "break",
                                                                               marks=pytest.mark.slow)],
                         ids=["SIGINT_step_finishes", "SIGTERM_step_broken"])
def test_a_signal_to_the_process_group_during_the_first_step_stops_cleanly(tiny_1b, tmp_path, subset_meta, sig,
                                                                           mode):
    """Ctrl-C (and Slurm's SIGTERM alike) signals the whole process group, data-loader workers included, while the
    first step runs (issue 26: compilation): one line, exit 128 + N, no traceback; a checkpoint of step 1 when the
    step could finish, none when the signal broke it."""
    meta = subset_meta(tmp_path, 8)
    started = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", SLOW_FIRST_STEP, str(started), mode, *_cli(tiny_1b, meta, tmp_path / "run")[3:],
               "--dataloader_num_workers", "2"]
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and run.poll() is None and not started.exists():
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(run.pid, sig)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err + out and "DataLoader worker" not in err, err[-3000:]
    assert err.count("stopped by") == 1, err[-3000:]
    stops = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if "stopped by" in line]
    if mode == "break":
        assert stops == [f"stopped by {sig.name} during step 1, which it broke (RuntimeError: SubprocException: a "
                         "compile worker died); no checkpoint of it: no earlier checkpoint exists"], err[-3000:]
        assert list_checkpoints(tmp_path / "run") == [] and not list((tmp_path / "run").glob("*.partial"))
        return
    assert stops == [f"stopped by {sig.name} at step 1: checkpoint-1 written; resume with --resume_from_checkpoint "
                     "auto"], err[-3000:]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]
    assert Checkpointer(tmp_path / "run", DistInfo()).problems(tmp_path / "run" / "checkpoint-1") == []


LEFT_OPEN = """
import torch
from internvl_tune.train.runtime import make_loader
loader = iter(make_loader(list(range(8)), [[0, 1], [2, 3]], torch.utils.data.default_collate, 2))
print(next(loader).batch.tolist())
"""


def test_a_data_loader_left_open_at_exit_does_not_hang_the_process():
    """Workers ignore SIGTERM, which multiprocessing's exit-time clean-up relies on; they are killed instead."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", LEFT_OPEN], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[0, 1]", done.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step(tiny_1b, tmp_path, subset_meta):
    meta = subset_meta(tmp_path, 8)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", *_cli(tiny_1b, meta, tmp_path / "run", "--max_steps", "40",
                                                "--per_device_train_batch_size", "1", "--device", "cpu")[2:]]
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and run.poll() is None and not (log.exists() and len(read_jsonl(log)) >= 2):
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    out, err = run.communicate(timeout=240)
    assert run.returncode != 0  # torchrun itself reports the signal; `torchrun ... && merge-lora` stops
    assert err.count("stopped by SIGTERM at step") == 1, err[-3000:]  # rank 0 prints; both ranks stopped
    saved = list_checkpoints(tmp_path / "run")
    assert len(saved) == 1 and Checkpointer(tmp_path / "run", DistInfo()).problems(saved[0]) == []
    assert len(list(saved[0].glob("rank*.safetensors"))) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_closing_line_and_results_give_the_steady_state_throughput(tiny_1b, tmp_path, subset_meta, monkeypatch):
    """The first step is made 2 s slower (as compilation makes it on a GPU): the wall-clock average carries it, the
    steady-state figure leaves it out and lies within the per-step figures of the steps it covers."""
    import json

    from train_helpers import run_chat, train_config

    from internvl_tune.train import step as step_module

    real = step_module.StepRunner.__call__

    def slow_first(self, batches, n, *rest):
        if n == 0:
            time.sleep(2.0)
        return real(self, batches, n, *rest)

    monkeypatch.setattr(step_module.StepRunner, "__call__", slow_first)
    out = tmp_path / "run"
    run_chat(train_config(tiny_1b, subset_meta(tmp_path, 8), out, max_steps=6, save_steps=0, logging_steps=1))
    results = json.loads((out / "train_results.json").read_text())
    per_step = [r["tokens_per_s"] for r in read_jsonl(out / "metrics.jsonl") if "tokens_per_s" in r]
    assert len(per_step) == 6 and results["steady_after_steps"] == 2
    steady, wall = results["steady_tokens_per_s"], results["tokens_per_s"]
    assert min(per_step[2:]) <= steady <= max(per_step[2:])  # steps 3-6: a work-weighted mean of their rates
    assert steady > wall  # the wall-clock average carries the slow first step, set-up and export
    closing = (out / "train.log").read_text().splitlines()[-1]
    assert f"{wall:.0f} tokens/s wall-clock average, {steady:.0f} tokens/s steady (after the first 2 steps)" in closing


def test_resuming_with_another_global_batch_is_refused_with_the_settings_that_fit(tiny_1b, tmp_path, subset_meta):
    from train_helpers import run_chat, train_config

    meta = subset_meta(tmp_path, 4)
    run_chat(train_config(tiny_1b, meta, tmp_path / "run", max_steps=1))
    with pytest.raises(UserError) as info:
        run_chat(train_config(tiny_1b, meta, tmp_path / "run", per_device_train_batch_size=1,
                              resume_from_checkpoint="auto"))
    assert ("was trained with a global batch of 2 samples per step; this run's is 1 (1 per device x 1 processes x 1 "
            "accumulation steps)") in str(info.value)
    assert ("e.g. --per_device_train_batch_size 1 --gradient_accumulation_steps 2 or --per_device_train_batch_size 2 "
            "--gradient_accumulation_steps 1") in str(info.value)


def _steps(model, meta, out, per_device, max_steps, resume):
    from train_helpers import run_chat, train_config

    return run_chat(train_config(model, meta, out, per_device_train_batch_size=per_device, max_steps=max_steps,
                                 resume_from_checkpoint=resume)).losses


@pytest.mark.slow
def test_resuming_on_two_processes_then_one_continues_the_loss_curve(tiny_1b, tmp_path, subset_meta):
    """1 process to step 2, 2 processes to step 3, 1 process to step 4 (the global batch stays 4 samples) give the
    losses of one uninterrupted run, within fp32 rounding (gradients are summed in another order)."""
    from train_helpers import spawn

    meta = str(subset_meta(tmp_path, 8))
    reference = spawn(1, _steps, str(tiny_1b), meta, str(tmp_path / "one"), 4, 4, None)
    third = spawn(2, _steps, str(tiny_1b), meta, str(tmp_path / "two"), 2, 3, str(tmp_path / "one" / "checkpoint-2"))
    fourth = spawn(1, _steps, str(tiny_1b), meta, str(tmp_path / "back"), 4, 4, str(tmp_path / "two" / "checkpoint-3"))
    assert len(reference) == 4 and len(third) == len(fourth) == 1
    assert third[0] == pytest.approx(reference[2], rel=1e-5) and fourth[0] == pytest.approx(reference[3], rel=1e-5)
