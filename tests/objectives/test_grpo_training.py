"""GRPO / GSPO end to end on a tiny InternVL2 and the bundled prompt sample (CPU): exact resume inside a
--num_iterations block, 2 gloo ranks equal 1, and the CLI with packing, the KL reference pass, metrics, TensorBoard
tags and completions.jsonl."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_tune.data.config import DataConfig
from internvl_tune.models.internvl_chat.objectives import objective_section
from internvl_tune.models.internvl_chat.recipe import ModelArgs
from internvl_tune.train.config import RunConfig, TrainArgs
from internvl_tune.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]
META = REPO / "examples" / "sample" / "prompts_meta.json"
REWARDS = f"accuracy,choice,iou,format,{Path(__file__).parent / 'toy_rewards.py'}:distinct_characters"
TERMS = ("loss", "entropy", "kl", "clip_ratio/region_mean", "reward", "reward_std", "rewards/accuracy/mean",
         "completions/mean_length", "grad_norm")
LORA = dict(use_llm_lora=4, freeze_mlp=True, lora_dropout=0.0)


def _run(model, out, model_flags=LORA, objective="grpo", grpo=None, **train):
    from internvl_tune.cli.train import recipe
    from internvl_tune.train.trainer import run

    cfg = RunConfig(
        model=ModelArgs(model_name_or_path=str(model), grad_checkpoint="False", freeze_backbone=True, **model_flags),
        data=DataConfig(meta_path=str(META), conv_style="Hermes-2", force_image_size=56, dynamic_image_size=True,
                        max_dynamic_patch=2, max_seq_length=400),
        train=TrainArgs(**{"output_dir": str(out), "max_steps": 4, "save_steps": 3, "per_device_train_batch_size": 2,
                           "learning_rate": 5e-3, "dataloader_num_workers": 0, "report_to": "none", "seed": 0,
                           **train}),
        objective=objective_section()(objective=objective, **{
            "num_generations": 3, "max_completion_length": 5, "reward_funcs": REWARDS, "beta": 0.05,
            "num_iterations": 2, **(grpo or {})}),
    )
    return run(recipe(cfg), cfg)


def _rows(out: Path) -> dict[int, tuple]:
    return {r["step"]: tuple(r.get(k) for k in TERMS) for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}


def test_resume_inside_an_iteration_block_repeats_everything(tiny_1b, tmp_path):
    out = tmp_path / "run"
    _run(tiny_1b, out)  # blocks of 2 steps on one batch of completions; a checkpoint after step 3 (inside a block)
    reference = _rows(out)
    completions = (out / "completions.jsonl").read_text()
    assert sorted(reference) == [1, 2, 3, 4]
    assert reference[1][TERMS.index("kl")] == 0.0 and reference[2][TERMS.index("kl")] > 0  # the policy moved
    assert reference[3][TERMS.index("reward")] == reference[4][TERMS.index("reward")]  # one block, one rollout
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["module"]["rollouts"][0]["step"] == 2 and state["module"]["rollouts"][0]["micro"][0]["old_log_probs"]
    shutil.rmtree(out / "checkpoint-3.old", ignore_errors=True)
    (out / "completions.jsonl").write_text("")
    _run(tiny_1b, out, resume_from_checkpoint=str(out / "checkpoint-3"))
    assert _rows(out) == reference
    assert (out / "completions.jsonl").read_text() == ""  # step 4 reused step 3's completions: none sampled
    rows = [json.loads(line) for line in completions.splitlines()]
    assert {r["step"] for r in rows} == {1, 3} and len(rows) == 2 * 2 * 3  # 2 rollouts x 2 prompts x 3 completions
    assert set(rows[0]) == {"step", "sample_id", "prompt", "completion", "rewards", "reward", "advantage"}


def _three_steps(model, out, model_flags) -> dict[int, tuple]:
    world = int(os.environ["WORLD_SIZE"])
    _run(model, out, model_flags, max_steps=3, per_device_train_batch_size=2 // world, device="cpu",
         grpo={"scale_rewards": "batch", "num_iterations": 1})
    return _rows(Path(out))


@pytest.mark.slow
@pytest.mark.parametrize("model_flags", [LORA, {}], ids=["lora", "frozen-copy"])
def test_two_gloo_processes_match_one_process(tiny_1b, tmp_path, model_flags):
    # each rank samples its prompts' completions (same keys: same completions), rewards and advantages stay with
    # the prompt, the batch std and the loss normaliser are global: 2 ranks x 1 prompt = 1 rank x 2 prompts
    from train_helpers import spawn

    one = spawn(1, _three_steps, str(tiny_1b), str(tmp_path / "one"), model_flags)
    two = spawn(2, _three_steps, str(tiny_1b), str(tmp_path / "two"), model_flags)
    assert one.keys() == two.keys() == {1, 2, 3} and one[3][TERMS.index("kl")] > 0
    for step in one:
        for name, a, b in zip(TERMS, one[step], two[step]):
            assert a is not None and abs(a - b) <= 1e-5 * max(1.0, abs(a)), (step, name, a, b)


def test_cli_gspo_with_packing_logs_rewards_and_exports_the_adapter(tiny_1b, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "internvl_tune.cli", "train", "--objective", "gspo", "--model_name_or_path",
           str(tiny_1b), "--meta_path", str(META), "--output_dir", str(out), "--conv_style", "Hermes-2",
           "--force_image_size", "56", "--max_dynamic_patch", "2", "--max_seq_length", "400",
           "--dataloader_num_workers", "0", "--grad_checkpoint", "False", "--freeze_backbone", "--freeze_mlp",
           "--use_llm_lora", "4", "--use_packed_ds", "--max_steps", "2", "--per_device_train_batch_size", "2",
           "--num_generations", "2", "--max_completion_length", "4", "--reward_funcs", REWARDS, "--reward_weights",
           "1,1,1,0.5,1", "--beta", "0.1", "--report_to", "tensorboard"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = " ".join((out / "train.log").read_text().split())
    assert "objective gspo: 2 completions per prompt (up to 4 tokens" in log and "sequence-level ratio, loss grpo" in log
    assert "reference model: the model with its LoRA adapters disabled" in log
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(0 <= r["completions/mean_length"] <= 4 for r in rows)
    assert {"reward", "reward_std", "rewards/format/mean", "kl", "entropy", "clip_ratio/region_mean",
            "frac_reward_zero_std", "time/generation_s"} <= set(rows[0])
    tags = EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]
    assert {"train/reward", "train/rewards/format/mean", "train/kl", "train/completions/mean_length"} <= set(tags)
    assert len((out / "completions.jsonl").read_text().splitlines()) == 2 * 2 * 2  # 2 steps x 2 prompts x 2
    assert (out / "reward.png").stat().st_size > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "config.json").is_file()


@pytest.mark.slow
def test_qlora_with_the_kl_reference_pass(tiny_1b, tmp_path):
    # 4-bit LLM linears under LoRA (bitsandbytes' CPU kernels): generation, the adapters-off reference, the update
    pytest.importorskip("bitsandbytes")
    result = _run(tiny_1b, tmp_path / "q", {**LORA, "load_in_4bit": True}, max_steps=2, save_steps=0,
                  grpo={"num_iterations": 1})
    rows = _rows(tmp_path / "q")
    assert result.steps == 2 and all(v is not None for v in rows[2]), rows
    assert "LLM linear layers in 4 bits" in (tmp_path / "q" / "train.log").read_text()


def test_bad_flags_are_refused_before_loading(tiny_1b, tmp_path):
    from internvl_tune.errors import UserError

    with pytest.raises(UserError, match="--eval_meta_path: validation is not implemented for --objective grpo"):
        from internvl_tune.cli.train import recipe

        recipe(RunConfig(model=ModelArgs(model_name_or_path=str(tiny_1b)),
                         data=DataConfig(meta_path=str(META), eval_meta_path=str(META)),
                         objective=objective_section()(objective="grpo")))
    with pytest.raises(UserError, match="'exactness': not a built-in"):
        _run(tiny_1b, tmp_path / "x", grpo={"reward_funcs": "exactness"})
