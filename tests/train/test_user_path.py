"""What a user combines: validation + checkpoints + LoRA with a trained LM head + resume + chat/merge of a checkpoint,
settings taken from the checkpoint, metric sinks and run outputs, and a Ctrl-C under ``| tee``."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import run_chat

from internvl_tune.cli import main
from internvl_tune.data.config import DataConfig
from internvl_tune.errors import UserError
from internvl_tune.models.internvl_chat.recipe import ModelArgs
from internvl_tune.train.config import RunConfig, TrainArgs
from internvl_tune.train.metrics import read_jsonl, smooth

REPO = Path(__file__).resolve().parents[2]


def _cfg(model, meta, out, **kw) -> RunConfig:
    """A LoRA run with a trained LM head that validates and checkpoints every 2 steps; no template or tile flags."""
    m = ModelArgs(model_name_or_path=str(model), freeze_backbone=True, freeze_llm=True, freeze_mlp=True,
                  use_llm_lora=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="q_proj,v_proj",
                  unfreeze_lm_head=True, grad_checkpoint="False")
    d = DataConfig(meta_path=str(meta), eval_meta_path=str(meta), max_dynamic_patch=2, max_seq_length=1024)
    t = TrainArgs(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                  logging_steps=1, save_steps=2, eval_steps=2, dataloader_num_workers=0, report_to="tensorboard",
                  seed=0)
    for key, value in kw.items():
        section = next(s for s in (m, d, t) if hasattr(s, key))
        setattr(section, key, value)
    return RunConfig(model=m, data=d, train=t)


@pytest.fixture(scope="module")
def lora_run(tiny_1b, tmp_path_factory, subset_meta):
    root = tmp_path_factory.mktemp("user_path")
    meta = subset_meta(root, 3)
    result = run_chat(_cfg(tiny_1b, meta, root / "run"))
    return root / "run", meta, result


def test_validation_and_checkpoints_together(lora_run):
    run, _, result = lora_run
    assert result.steps == 4 and not result.interrupted
    assert (run / "checkpoint-2" / "trainer_state.json").is_file() and (run / "checkpoint-4").is_dir()
    assert not list(run.glob("*.partial"))
    evals = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]
    assert evals == [2, 4]


def test_resume_from_a_mid_run_checkpoint_repeats_the_losses(lora_run, tiny_1b, tmp_path):
    import shutil

    run, meta, result = lora_run
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copytree(run / "checkpoint-2", copy / "checkpoint-2")
    resumed = run_chat(_cfg(tiny_1b, meta, copy, resume_from_checkpoint="auto"))
    assert resumed.losses == result.losses[2:]


def test_resume_with_another_lora_rank_is_a_readable_error(lora_run, tiny_1b, tmp_path):
    import shutil

    run, meta, _ = lora_run
    shutil.copytree(run / "checkpoint-2", tmp_path / "run" / "checkpoint-2")
    with pytest.raises(UserError, match="other LoRA ranks"):
        run_chat(_cfg(tiny_1b, meta, tmp_path / "run", use_llm_lora=8, resume_from_checkpoint="auto"))


def test_the_adapter_carries_the_lora_flags_and_the_trained_head(lora_run, tiny_1b):
    from internvl_tune.models.internvl_chat import load_pretrained

    run, _, _ = lora_run
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.0
    assert "q_proj" in config["target_modules"] and "o_proj" not in config["target_modules"]
    assert config["modules_to_save"] == ["lm_head"]
    merged, base = load_pretrained(run), load_pretrained(tiny_1b)
    assert not torch.equal(merged.model.lm_head.weight, base.model.lm_head.weight)  # the trained head was kept


def test_a_checkpoint_loads_as_a_model_for_chat_and_merge(lora_run, tmp_path, capsys):
    from internvl_tune.cli.chat import load_model
    from internvl_tune.models.internvl_chat import load_pretrained

    run, _, _ = lora_run
    at_4 = load_model(str(run / "checkpoint-4"), None)
    final = load_pretrained(run)  # the merged model of the same (last) step
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        assert torch.allclose(at_4.model(input_ids=ids).logits, final.model(input_ids=ids).logits, atol=1e-4)
    assert main(["merge-lora", str(run / "checkpoint-2"), "--out", str(tmp_path / "merged2")]) == 0
    at_2 = load_pretrained(tmp_path / "merged2")
    assert not torch.equal(at_2.model.lm_head.weight, final.model.lm_head.weight)  # step 2, not the end
    assert main(["chat", str(run / "checkpoint-2"), "--max_new_tokens", "3", "Hi"]) == 0


def test_run_outputs_summary_text_log_and_grouped_sink_tags(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, result = lora_run
    summary = json.loads((run / "train_results.json").read_text())
    assert summary["global_step"] == 4 and summary["train_loss"] == pytest.approx(result.losses[-1])
    assert summary["eval_loss"] is not None and summary["tokens_per_s"] > 0
    log = (run / "train.log").read_text()
    assert "template Hermes-2" in log and "step 4/4" in log and "eval_loss" in log and "done: 4 steps" in log
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/loss"} <= tags and "loss" not in tags


def test_settings_default_to_the_checkpoint(tiny_1b, tmp_path, subset_meta, capsys):
    meta = subset_meta(tmp_path, 2)
    common = ["train", "--model_name_or_path", str(tiny_1b), "--meta_path", str(meta), "--output_dir",
              str(tmp_path / "run"), "--dry_run", "--report_to", "none", "--device", "cpu"]
    assert main(common) == 0
    plan = capsys.readouterr().err
    # the tiny InternVL2-1B says Hermes-2, 56 px tiles of 4 tokens, dynamic tiles up to 12 with a thumbnail
    assert "template Hermes-2" in " ".join(plan.split()) and "56 px tiles x 4 tokens" in " ".join(plan.split())
    assert "dynamic tiles 1-12 + thumbnail" in " ".join(plan.split())
    assert main([*common, "--force_image_size", "56"]) == 0  # the checkpoint's own size is fine
    assert main([*common, "--force_image_size", "448"]) == 2
    assert "pass --force_image_size 56" in capsys.readouterr().err
    assert main([*common, "--conv_style", "internlm2-chat"]) == 0
    assert "the checkpoint says Hermes-2" in " ".join(capsys.readouterr().err.split())
    assert main([*common, "--grad_checkpoint", "auto"]) == 0  # on a CPU there is no GPU memory to fit
    assert "activation checkpointing auto: every block" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("sinks, message", [("tensorbord", "unknown sink tensorbord"),
                                            ("tensorboard,none", "unknown sink none")])
def test_unknown_metric_sinks_are_errors(sinks, message):
    from internvl_tune.train.metrics import parse_report_to

    with pytest.raises(UserError, match=message):
        parse_report_to(sinks)
    assert parse_report_to("none") == [] and parse_report_to("tensorboard") == ["tensorboard"]


def test_a_sink_whose_package_is_missing_is_an_error():
    import importlib.util

    from internvl_tune.train.metrics import parse_report_to

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(UserError, match="pip install wandb"):
        parse_report_to("tensorboard,wandb")


def test_smoothing_follows_the_trend_and_starts_unbiased():
    assert smooth([5.0]) == [5.0]  # debiased: the first point is the point itself
    values = [10.0 - i + (3.0 if i % 2 else -3.0) for i in range(20)]
    smoothed = smooth(values)
    assert smoothed[-1] < smoothed[0] - 5  # follows the downward trend
    assert max(abs(b - a) for a, b in zip(smoothed, smoothed[1:])) < 3.0  # the raw series jumps by 6 each step


@pytest.mark.slow
def test_ctrl_c_under_tee_still_writes_the_stop_checkpoint(tiny_1b, tmp_path, subset_meta):
    meta = subset_meta(tmp_path, 8)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "internvl_tune.cli", "train", "--model_name_or_path", str(tiny_1b), "--meta_path",
           str(meta), "--output_dir", str(out), "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0",
           "--report_to", "none", "--grad_checkpoint", "False", "--freeze_backbone", "--max_steps", "200",
           "--save_steps", "1000", "--logging_steps", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    shell = " ".join(f"'{c}'" for c in cmd) + f" 2>&1 | tee '{tmp_path / 'console.txt'}'"
    # a new session: Ctrl-C reaches the whole pipeline (python and tee), as in a terminal
    proc = subprocess.Popen(["sh", "-c", shell], env=env, start_new_session=True)
    log = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (log.exists() and len(read_jsonl(log)) >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=180)
    deadline = time.time() + 180  # tee is gone; python finishes its step, saves, and says so in its own log
    while time.time() < deadline and "stopped by SIGINT" not in (out / "train.log").read_text():
        time.sleep(0.2)
    assert "stopped by SIGINT at step" in (out / "train.log").read_text()
    assert list(out.glob("checkpoint-*/trainer_state.json")), "Ctrl-C under tee must still leave the stop checkpoint"


class _DeviceTimeline:
    """A stand-in for CUDA events: each mark is one second after the previous one on the device's timeline, however
    late the host reads it back."""

    def __init__(self, device):
        self.now = 0

    def mark(self):
        self.now += 1
        return self.now

    def seconds(self, start, end) -> float:
        time.sleep(0.05)  # the host reads late: a host clock would disagree with the device's
        return float(end - start)


def test_throughput_of_every_step_comes_from_the_device_timeline(tiny_1b, tmp_path, subset_meta, monkeypatch):
    """Issue 14.5: the last step of a run was logged 30x faster than the others (the host clock at read-back)."""
    import internvl_tune.train.step as step_module

    monkeypatch.setattr(step_module, "StepClock", _DeviceTimeline)
    out = tmp_path / "run"
    run_chat(_cfg(tiny_1b, subset_meta(tmp_path, 3), out, max_steps=3, save_steps=0, eval_steps=2))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "tokens_per_s" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]  # step 3 follows a validation pass
    # each step spans one device second, so its tokens/s is its token count: they add up to every token seen
    seen = json.loads((out / "train_results.json").read_text())["tokens_seen"]
    assert sum(r["tokens_per_s"] for r in rows) == pytest.approx(seen)
    assert all(r["tokens_per_s"] == int(r["tokens_per_s"]) for r in rows)
