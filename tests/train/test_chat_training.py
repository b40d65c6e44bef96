"""InternVL2 fine-tuning end to end on tiny checkpoints and the bundled sample (CPU)."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from internvl_tune.data.config import DataConfig
from internvl_tune.models.internvl_chat.recipe import ModelArgs
from internvl_tune.train.config import RunConfig, TrainArgs
from internvl_tune.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]


def _cfg(model, meta, out, **kw) -> RunConfig:
    m = ModelArgs(model_name_or_path=str(model), freeze_backbone=True, grad_checkpoint="False")
    d = DataConfig(meta_path=str(meta), conv_style="Hermes-2", force_image_size=56, max_dynamic_patch=4,
                   dynamic_image_size=True, use_thumbnail=True, max_seq_length=1024)
    t = TrainArgs(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                  logging_steps=1, save_steps=1000, dataloader_num_workers=0, report_to="none", seed=0)
    for key, value in kw.items():
        for section in (m, d, t):
            if hasattr(section, key):
                setattr(section, key, value)
                break
        else:
            raise KeyError(key)
    return RunConfig(model=m, data=d, train=t)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def test_full_finetune_overfits_the_sample(tiny_1b, tmp_path, subset_meta):
    from train_helpers import run_chat as run

    meta = subset_meta(tmp_path, 2)
    result = run(_cfg(tiny_1b, meta, tmp_path / "run", max_steps=40, learning_rate=3e-3, warmup_steps=2,
                      lr_scheduler_type="constant", eval_meta_path=str(meta), eval_steps=20))
    losses = result.losses
    assert len(losses) == 40
    assert losses[-1] < 0.2 * losses[0], losses
    out = tmp_path / "run"
    for name in ("config.json", "config.yaml", "metrics.csv", "loss.png", "lr.png", "grad_norm.png"):
        assert (out / name).exists(), name
    assert list(out.glob("*.safetensors"))
    evals = [r["eval_loss"] for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]  # validation on the training subset falls too


def _trainable(chat) -> set[str]:
    return {n for n, p in chat.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "flags, expect",
    [
        (dict(), {"vision", "projector", "llm", "lm_head"}),
        (dict(freeze_backbone=True), {"projector", "llm", "lm_head"}),
        (dict(freeze_backbone=True, freeze_llm=True), {"projector"}),
        (dict(freeze_backbone=True, freeze_llm=True, freeze_mlp=True, unfreeze_lm_head=True), {"lm_head"}),
        (dict(freeze_backbone=True, freeze_mlp=True, freeze_llm=True, use_llm_lora=4), {"llm_lora"}),
        (dict(freeze_llm=True, freeze_mlp=True, use_backbone_lora=4, freeze_backbone=True), {"vision_lora"}),
        (dict(freeze_backbone=True, freeze_llm=True, freeze_mlp=True, unfreeze_vit_layers=-1), {"vision_last"}),
    ],
)
def test_freeze_and_lora_flags_train_exactly_the_intended_parameters(tiny_1b, flags, expect):
    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.recipe import apply_trainable_flags

    chat = load_pretrained(tiny_1b)
    apply_trainable_flags(chat, ModelArgs(**flags))
    names = _trainable(chat)
    parts = {
        "vision": {n for n, _ in chat.model.named_parameters() if ".vision_tower." in n},
        "projector": {n for n, _ in chat.model.named_parameters() if ".multi_modal_projector." in n},
        "llm": {n for n, _ in chat.model.named_parameters() if ".language_model." in n},
        "lm_head": {"lm_head.weight"},
    }
    n_layers = len(chat.model.model.vision_tower.encoder.layer)
    parts["llm_lora"] = {n for n in parts["llm"] if "lora_" in n}
    parts["vision_lora"] = {n for n in parts["vision"] if "lora_" in n}
    parts["vision_last"] = {n for n in parts["vision"] if f".encoder.layer.{n_layers - 1}." in n}
    wanted = set().union(*(parts[e] for e in expect))
    assert wanted and names == wanted


def _three_steps(model, meta, out, extra) -> list[float]:
    from train_helpers import run_chat as run

    world = int(os.environ["WORLD_SIZE"])
    return run(_cfg(model, meta, out, per_device_train_batch_size=4 // world, max_steps=3, device="cpu", **extra)).losses


def _spawn(world, model, meta, out, **extra):
    from train_helpers import spawn

    return spawn(world, _three_steps, str(model), str(meta), str(out), extra)


@pytest.mark.slow
def test_two_gloo_processes_train_lora_from_rank0_weights(tiny_1b, tmp_path, subset_meta):
    # ranks > 0 build LoRA on the meta device and receive every tensor from rank 0. Dropout differs per rank, so the
    # curve is not compared with one process; but the first loss is exact: LoRA's B starts at 0, so the dropped-out
    # inputs of the LoRA branch change nothing before the first update.
    meta = subset_meta(tmp_path, 4)
    one = _spawn(1, tiny_1b, meta, tmp_path / "one", use_llm_lora=4)
    two = _spawn(2, tiny_1b, meta, tmp_path / "two", use_llm_lora=4)
    assert len(two) == 3 and all(math.isfinite(x) for x in two)
    assert abs(one[0] - two[0]) <= 1e-5 * max(1.0, abs(one[0])), (one, two)


def _cli(model, meta, out, *extra) -> list[str]:
    return [sys.executable, "-m", "internvl_tune.cli", "train", "--model_name_or_path", str(model),
            "--meta_path", str(meta), "--output_dir", str(out), "--conv_style", "Hermes-2",
            "--force_image_size", "56", "--dynamic_image_size", "--max_dynamic_patch", "4",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--dataloader_num_workers", "0",
            "--report_to", "none", "--grad_checkpoint", "False", "--freeze_backbone", "--use_llm_lora", "4",
            "--max_steps", "6", "--save_steps", "2", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_losses(tiny_1b, tmp_path, subset_meta):
    meta = subset_meta(tmp_path, 6)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(_cli(tiny_1b, meta, tmp_path / "ref"), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = _losses(tmp_path / "ref")
    victim = subprocess.Popen(_cli(tiny_1b, meta, tmp_path / "run"), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoint-4").exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = subprocess.run(_cli(tiny_1b, meta, tmp_path / "run", "--resume_from_checkpoint", "auto"),
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(tmp_path / "run") == reference  # bitwise on CPU
    assert (tmp_path / "run" / "adapter").is_dir()


def test_lora_export_merges_to_the_adapter_logits(tiny_1b, tmp_path, subset_meta):
    from train_helpers import run_chat as run

    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.lora import load_adapter

    meta = subset_meta(tmp_path, 2)
    run(_cfg(tiny_1b, meta, tmp_path / "run", use_llm_lora=4, freeze_llm=True, freeze_mlp=True, max_steps=3,
             learning_rate=1e-2))
    merged = load_pretrained(tmp_path / "run")
    based = load_pretrained(tiny_1b)
    load_adapter(based, tmp_path / "run" / "adapter")
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        a = merged.model(input_ids=ids).logits
        b = based.model(input_ids=ids).logits
        c = load_pretrained(tiny_1b).model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)  # the adapter changed something


def test_existing_checkpoints_need_resume_or_overwrite(tiny_1b, tmp_path, subset_meta):
    from train_helpers import run_chat as run

    from internvl_tune.errors import UserError

    meta = subset_meta(tmp_path, 2)
    run(_cfg(tiny_1b, meta, tmp_path / "run", max_steps=1, save_steps=1))
    with pytest.raises(UserError, match="resume_from_checkpoint auto"):
        run(_cfg(tiny_1b, meta, tmp_path / "run", max_steps=2))


def test_the_data_settings_are_the_checkpoints_once_the_recipe_exists(tiny_1b, monkeypatch):
    """Template and tiling come from config.json when the recipe is built, before (and without) any weight."""
    from internvl_tune.errors import UserError
    from internvl_tune.models.internvl_chat import chat as chat_module
    from internvl_tune.models.internvl_chat.recipe import ChatRecipe

    monkeypatch.setattr(chat_module, "load_weights", lambda *a: pytest.fail("weights were read"))
    recipe = ChatRecipe(ModelArgs(model_name_or_path=str(tiny_1b)), DataConfig(meta_path="m"))
    d = recipe.data
    assert d.resolved and (d.conv_style, d.force_image_size, d.max_dynamic_patch, d.use_thumbnail) == \
        ("Hermes-2", 56, 12, True)
    with pytest.raises(UserError, match="--force_image_size 448 differs from .*image_size 56"):
        ChatRecipe(ModelArgs(model_name_or_path=str(tiny_1b)), DataConfig(meta_path="m", force_image_size=448))
