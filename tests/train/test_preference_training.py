"""Preference tuning end to end on a tiny InternVL2 and the bundled preference sample (CPU): exact resume, the CLI
with packing and TensorBoard tags, and the MPO launch script."""

import math
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
META = REPO / "examples" / "sample" / "preference_meta.json"
TERMS = ("loss", "sigmoid_loss", "bco_pair_loss", "nll_loss", "rewards/chosen", "rewards/rejected",
         "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm")


LORA = dict(use_llm_lora=4, freeze_mlp=True)


def _run(model, out, model_flags=LORA, **train):
    """An in-process MPO run on the preference sample (LoRA by default)."""
    from internvl_tune.cli.train import recipe
    from internvl_tune.train.trainer import run

    cfg = RunConfig(
        model=ModelArgs(model_name_or_path=str(model), grad_checkpoint="False", freeze_backbone=True, **model_flags),
        data=DataConfig(meta_path=str(META), conv_style="Hermes-2", force_image_size=56, dynamic_image_size=True,
                        max_dynamic_patch=2),
        train=TrainArgs(**{"output_dir": str(out), "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 2,
                           "learning_rate": 2e-3, "dataloader_num_workers": 0, "report_to": "none", "seed": 0, **train}),
        objective=objective_section()(objective="mpo"),
    )
    return run(recipe(cfg), cfg)


def _rows(out: Path) -> dict[int, tuple]:
    return {r["step"]: tuple(r[k] for k in TERMS) for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}


def test_resume_repeats_every_term_bit_for_bit(tiny_1b, tmp_path):
    out = tmp_path / "run"
    _run(tiny_1b, out)  # 4 steps over two epochs of 3, checkpoints at 2 and 4, LoRA dropout on
    reference = _rows(out)
    assert len(reference) == 4 and reference[1][TERMS.index("rewards/margins")] == 0.0  # the policy starts as its reference
    assert reference[4][TERMS.index("rewards/margins")] != 0.0
    shutil.rmtree(out / "checkpoint-4")
    _run(tiny_1b, out, resume_from_checkpoint=str(out / "checkpoint-2"))
    assert _rows(out) == reference  # the bco_pair reward shift came back with the checkpoint too


def _three_steps(model, out, model_flags) -> dict[int, tuple]:
    world = int(os.environ["WORLD_SIZE"])
    _run(model, out, model_flags, max_steps=3, per_device_train_batch_size=2 // world, device="cpu")
    return _rows(Path(out))


@pytest.mark.slow
@pytest.mark.parametrize("model_flags", [{}, {**LORA, "lora_dropout": 0.0}], ids=["frozen-copy", "lora"])
def test_two_gloo_processes_match_one_process(tiny_1b, tmp_path, model_flags):
    # the reward shift and the per-pair normalisation are global: 2 ranks x 1 pair = 1 rank x 2 pairs (without
    # dropout, whose masks differ per rank); the copy's blocks are sharded and filled from rank 0 like the policy's
    from train_helpers import spawn

    one = spawn(1, _three_steps, str(tiny_1b), str(tmp_path / "one"), model_flags)
    two = spawn(2, _three_steps, str(tiny_1b), str(tmp_path / "two"), model_flags)
    assert one.keys() == two.keys() == {1, 2, 3} and one[3][TERMS.index("rewards/margins")] != 0.0
    for step in one:
        for name, a, b in zip(TERMS, one[step], two[step]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (step, name, a, b)


def _cli(model, out, *extra) -> list[str]:
    return [sys.executable, "-m", "internvl_tune.cli", "train", "--model_name_or_path", str(model), "--meta_path",
            str(META), "--output_dir", str(out), "--conv_style", "Hermes-2", "--force_image_size", "56",
            "--dynamic_image_size", "--max_dynamic_patch", "2", "--dataloader_num_workers", "0", "--grad_checkpoint",
            "False", "--freeze_backbone", "--freeze_mlp", "--use_llm_lora", "4", "--learning_rate", "2e-3", *extra]


def test_cli_dpo_with_packing_and_validation_logs_the_terms_grouped_and_exports_the_adapter(tiny_1b, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_cli(tiny_1b, out, "--objective", "dpo", "--use_packed_ds", "--max_packed_tokens", "600",
                               "--max_steps", "3", "--report_to", "tensorboard", "--eval_meta_path", str(META),
                               "--eval_steps", "3"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = " ".join((out / "train.log").read_text().split())
    assert "objective dpo: 1 x sigmoid, beta 0.1; reference model: the model with its LoRA adapters disabled" in log
    assert "packed rows" in log
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(0.0 <= r["rewards/accuracies"] <= 1.0 for r in rows)
    assert "nll_loss" not in rows[0] and rows[0]["sigmoid_loss"] == rows[0]["loss"]
    # before the first update the policy is its reference (LoRA's B is 0): every margin is 0, each pair's loss
    # -log sigmoid(0) = log 2
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6 and rows[0]["rewards/margins"] == 0.0
    evals = [r["eval_loss"] for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
    # three steps on these pairs: the policy now prefers their chosen answers more than the reference does
    assert len(evals) == 1 and evals[0] < math.log(2) - 1e-3, evals
    tags = EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]
    assert {"train/loss", "train/sigmoid_loss", "train/rewards/chosen", "train/rewards/margins",
            "train/logps/rejected"} <= set(tags)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "config.json").is_file()


@pytest.mark.slow
def test_mpo_launch_script_trains_a_tiny_model(tiny_1b, tmp_path):
    script = REPO / "shell" / "internvl2.5_mpo" / "preference_optimization" / \
        "internvl2_5_1b_qwen2_5_0_5b_dynamic_res_mpo.sh"
    out = tmp_path / "run"
    env = {**os.environ, "LAUNCHER": "pytorch", "GPUS": "1", "BATCH_SIZE": "2", "PYTHON": sys.executable,
           "MODEL": str(tiny_1b), "OUTPUT_DIR": str(out), "META_PATH": str(META), "PYTHONPATH": str(REPO / "src"),
           "MASTER_PORT": str(29000 + os.getpid() % 1000), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["sh", str(script), "--bf16", "False", "--max_steps", "2", "--force_image_size", "56",
                           "--max_dynamic_patch", "2", "--dataloader_num_workers", "0", "--report_to", "none",
                           "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "objective mpo: 0.8 x sigmoid + 0.2 x bco_pair + 1 x nll (rpo_alpha), beta 0.1" in log
    assert "reference model: a frozen copy" in log and "template internvl2_5" in log
    assert (out / "config.json").is_file() and len([r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]) == 2
