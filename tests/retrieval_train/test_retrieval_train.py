"""InternVL-C/G retrieval fine-tuning end to end on a tiny checkpoint and the bundled Flickr30K sample (CPU).

Run: pytest tests/retrieval_train -x
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from internvl_tune.data.retrieval import RetrievalDataArgs
from internvl_tune.models.internvl_cg.recipe import RetrievalModelArgs
from internvl_tune.train.config import RunConfig, TrainArgs
from internvl_tune.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]
HEAD = dict(freeze_model=True, freeze_vision_model=True, freeze_qllama=True, unfreeze_qllama_head=True)


def _cfg(model, data_root, out, **kw) -> RunConfig:
    m = RetrievalModelArgs(model_name_or_path=str(model), grad_checkpoint="False")
    d = RetrievalDataArgs(dataset_name="flickr30k_en_train", data_root=str(data_root), force_image_size=28)
    t = TrainArgs(output_dir=str(out), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3,
                  lr_scheduler_type="constant", logging_steps=1, save_steps=1000, dataloader_num_workers=0,
                  report_to="none", seed=0)
    for key, value in kw.items():
        section = next((s for s in (m, d, t) if hasattr(s, key)), None)
        if section is None:
            raise KeyError(key)
        setattr(section, key, value)
    return RunConfig(model=m, data=d, train=t)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(Path(out) / "metrics.jsonl") if "loss" in r]


# ----------------------------------------------------------------------------------------------- which params train
def _trainable(tiny_ckpt, **flags) -> set[str]:
    from internvl_tune.models.internvl_cg.loading import load_internvl_cg
    from internvl_tune.models.internvl_cg.recipe import apply_trainable_flags

    model = load_internvl_cg(tiny_ckpt, dtype="fp32")
    apply_trainable_flags(model, RetrievalModelArgs(**flags))
    assert model.qllama.lm_head.weight is model.qllama.model.embed_tokens.weight  # still tied
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_head_trains_text_projection_and_the_tied_lm_head(tiny_ckpt):
    # lm_head.weight is the input embedding (tied), so the reference's head recipe trains both
    assert _trainable(tiny_ckpt, **HEAD) == {"text_projection", "qllama.model.embed_tokens.weight"}


def test_lora_recipe_trains_adapters_and_head_only(tiny_ckpt):
    names = _trainable(tiny_ckpt, **HEAD, use_backbone_lora=4, use_qllama_lora=4)
    lora = {n for n in names if ".lora_" in n}
    assert names - lora == {"text_projection", "qllama.model.embed_tokens.weight"}
    # 2 ViT layers x (qkv, proj, fc1, fc2) + 3 QLLaMA layers x (q, k, v, o, gate, up, down), an A and a B each
    assert len(lora) == 2 * (2 * 4 + 3 * 7)
    assert not any("cross_attn" in n for n in lora)
    assert "vision_model.encoder.layers.1.attn.qkv.lora_A.default.weight" in lora


def test_lora_without_freeze_flags_freezes_only_the_wrapped_parts(tiny_ckpt):
    names = _trainable(tiny_ckpt, use_backbone_lora=4)
    assert {n for n in names if n.startswith("vision_model.")} == {n for n in names if ".lora_" in n}
    assert {"clip_projector.cross_attn.q.weight", "qllama.model.layers.0.self_attn.q_proj.weight",
            "query_tokens", "logit_scale", "itm_head.weight"} <= names


def test_full_and_crossattn_flags(tiny_ckpt):
    from internvl_tune.models.internvl_cg.loading import load_internvl_cg

    every = {n for n, _ in load_internvl_cg(tiny_ckpt, dtype="fp32").named_parameters()}
    assert _trainable(tiny_ckpt) == every
    cross = _trainable(tiny_ckpt, freeze_model=True, unfreeze_crossattn=True)
    assert cross and all(n.startswith("qllama.model.layers.") and ".cross_attn." in n for n in cross)
    assert {n.split(".")[3] for n in cross} == {"0", "2"}  # cross-attention every 2nd layer


# ----------------------------------------------------------------------------------------------- layer-wise lr decay
def test_layer_decay_groups_follow_the_reference_rule(tiny_ckpt):
    from internvl_tune.models.internvl_cg.layer_decay import layer_decay_lr_scale
    from internvl_tune.models.internvl_cg.loading import load_internvl_cg
    from internvl_tune.train.optim import build_param_groups

    model = load_internvl_cg(tiny_ckpt, dtype="fp32")
    # 2 ViT layers -> vit_L = 4; 3 QLLaMA layers -> q_L = 5; scale = min(1, rate ** (L - id - 1))
    groups = build_param_groups(model.named_parameters(), 1.0, 0.05, layer_decay_lr_scale(2, 3, 0.9, 0.8))
    by_name = {n: g for g in groups for n in g["names"]}
    expect = {
        "vision_model.embeddings.patch_embedding.weight": ("vit_layer_0_decay", 0.9 ** 3),
        "vision_model.embeddings.class_embedding": ("vit_layer_0_decay", 0.9 ** 3),
        "vision_model.encoder.layers.0.attn.qkv.weight": ("vit_layer_1_decay", 0.9 ** 2),
        "vision_model.encoder.layers.1.attn.proj.bias": ("vit_layer_2_no_decay", 0.9),
        "clip_projector.cross_attn.q.weight": ("vit_layer_4_decay", 1.0),
        "query_tokens": ("qllama_layer_0_decay", 0.8 ** 4),
        "qllama.model.embed_tokens.weight": ("qllama_layer_0_decay", 0.8 ** 4),
        "qllama.model.layers.0.self_attn.q_proj.weight": ("qllama_layer_1_decay", 0.8 ** 3),
        "qllama.model.layers.2.cross_attn.norm1.weight": ("qllama_layer_3_no_decay", 0.8),
        "qllama.model.norm.weight": ("qllama_layer_5_no_decay", 1.0),
        "text_projection": ("qllama_layer_5_decay", 1.0),
        "itm_head.weight": ("qllama_layer_5_decay", 1.0),
        "clip_projector2.norm1_q.bias": ("qllama_layer_5_no_decay", 1.0),
    }
    for name, (group, scale) in expect.items():
        assert by_name[name]["name"] == group, name
        assert by_name[name]["lr"] == pytest.approx(scale), name
        assert by_name[name]["weight_decay"] == (0.0 if group.endswith("no_decay") else 0.05)


# ----------------------------------------------------------------------------------------------- training runs
def test_loss_decreases_and_the_export_evaluates(tiny_ckpt, sample_root, tmp_path):
    from train_helpers import run_retrieval as run

    from internvl_tune.cli import main
    from internvl_tune.models.internvl_cg.loading import load_internvl_cg

    result = run(_cfg(tiny_ckpt, sample_root, tmp_path / "run", max_steps=8, use_custom_trainer=True,
                      vit_layer_decay_rate=0.9, qllama_layer_decay_rate=0.9))
    losses = _losses(tmp_path / "run")
    assert len(losses) == result.steps == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    trained, base = load_internvl_cg(tmp_path / "run", dtype="fp32"), load_internvl_cg(tiny_ckpt, dtype="fp32")
    assert trained.logit_scale.shape == ()  # back to the checkpoint's shape
    assert not torch.equal(trained.text_projection, base.text_projection)
    assert main(["eval", "retrieval", "--dataset", "flickr30k", "--dataset_root", str(sample_root / "flickr30k"),
                 "--pretrained", str(tmp_path / "run"), "--output", str(tmp_path / "r.json")]) == 0


def test_the_resolution_defaults_to_the_checkpoints(tiny_ckpt, sample_root, tmp_path):
    """A run at 56 px (the 28 px position embeddings interpolated) exports a 56 px checkpoint; training on from it
    takes 56 px without the flag, and the flag's default is the checkpoint's, not 224."""
    from train_helpers import run_retrieval as run

    from internvl_tune.models.internvl_cg.recipe import RetrievalRecipe

    run(_cfg(tiny_ckpt, sample_root, tmp_path / "run", max_steps=1, force_image_size=56, **HEAD))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["force_image_size"] == 56
    again = _cfg(tmp_path / "run", sample_root, tmp_path / "again", force_image_size=None, **HEAD)
    recipe = RetrievalRecipe(again.model, again.data, gather_fn=None)
    assert recipe.data.force_image_size == 56  # settled when the recipe is built, before any weight is read
    assert recipe.build_module(torch.float32).model.vision_model.image_size == 56
    base = _cfg(tiny_ckpt, sample_root, tmp_path / "base", force_image_size=None)
    assert RetrievalRecipe(base.model, base.data, gather_fn=None).data.force_image_size == 28


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_losses(tiny_ckpt, sample_root, tmp_path):
    from train_helpers import run_retrieval as run

    run(_cfg(tiny_ckpt, sample_root, tmp_path / "ref", max_steps=4, **HEAD, use_backbone_lora=2, use_qllama_lora=2))
    run(_cfg(tiny_ckpt, sample_root, tmp_path / "run", max_steps=2, save_steps=2, **HEAD, use_backbone_lora=2,
             use_qllama_lora=2))
    run(_cfg(tiny_ckpt, sample_root, tmp_path / "run", max_steps=4, save_steps=2, **HEAD, use_backbone_lora=2,
             use_qllama_lora=2, resume_from_checkpoint="auto"))
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")  # bitwise on CPU (LoRA dropout RNG restored)


def _spawn_worker(rank, world, port, model, data_root, out, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from train_helpers import run_retrieval as run

    result = run(_cfg(model, data_root, out, per_device_train_batch_size=8 // world))
    if rank == 0:
        q.put(result.losses)


def _spawn(world, model, data_root, out):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = mp.get_context("spawn").Queue()
    mp.start_processes(_spawn_worker, args=(world, port, str(model), str(data_root), str(out), q), nprocs=world,
                       start_method="spawn")
    return q.get(timeout=60)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tiny_ckpt, sample_root, tmp_path):
    one = _spawn(1, tiny_ckpt, sample_root, tmp_path / "one")
    two = _spawn(2, tiny_ckpt, sample_root, tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):  # steps 2 and 3 also check the gathered gradients
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one, two)


# ----------------------------------------------------------------------------------------------- CLI and scripts
def test_flags_env_and_yaml_precedence(tmp_path):
    import argparse

    from internvl_tune.cli.retrieval_train import env_defaults, sections
    from internvl_tune.models.internvl_cg.recipe import IGNORED_FLAGS
    from internvl_tune.train.config import build_arg_parser, load_config

    parser = build_arg_parser(argparse.ArgumentParser(), sections(), IGNORED_FLAGS)
    (tmp_path / "c.yaml").write_text("model:\n  qllama_layer_decay_rate: 0.7\ntrain:\n  learning_rate: 2.0e-6\n")
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--freeze_model", "--use_custom_trainer", "True",
                              "--use_backbone_lora", "16", "--deepspeed", "zero_stage3_config.json", "--optim",
                              "adamw_torch", "--pad_to_max_length", "True", "--learning_rate", "1e-6"])
    env = env_defaults({"VIT_LAYER_DECAY_RATE": "0.9", "QLLAMA_LAYER_DECAY_RATE": "0.9"})
    cfg = load_config(args, sections(), env)
    assert cfg.model.freeze_model and cfg.model.use_custom_trainer and cfg.model.use_backbone_lora == 16
    assert cfg.model.vit_layer_decay_rate == 0.9  # environment default
    assert cfg.model.qllama_layer_decay_rate == 0.7  # YAML beats the environment
    assert cfg.train.learning_rate == 1e-6  # flags beat YAML
    assert cfg.data.max_seq_length == 80 and cfg.data.force_image_size is None  # the checkpoint's


def test_unknown_dataset_name_is_a_user_error(tiny_ckpt, tmp_path):
    from internvl_tune.data.retrieval import dataset_spec
    from internvl_tune.errors import UserError

    with pytest.raises(UserError, match="coco_karpathy_train"):
        dataset_spec(RetrievalDataArgs(dataset_name="flickr_en"))
    spec = dataset_spec(RetrievalDataArgs(dataset_name="coco_karpathy_train", data_root="/d"))
    assert spec == {"root": "/d/coco", "annotation": "/d/coco/annotations/coco_karpathy_train.json"}


@pytest.mark.slow
def test_head_script_runs_end_to_end_and_keeps_the_exit_status(tiny_ckpt, sample_root, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = REPO / "shell/head_finetune/internvl_stage2_finetune_flickr_224_bs1024_ep10_head_4gpu.sh"
    env = {**os.environ, "GPUS": "1", "BATCH_SIZE": "4", "MODEL": str(tiny_ckpt), "DATA_ROOT": str(sample_root),
           "OUTPUT_DIR": str(tmp_path / "run"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(port), "PYTHONPATH": str(REPO / "src")}
    extra = ["--max_steps", "2", "--force_image_size", "28", "--report_to", "none", "--dataloader_num_workers", "0"]
    done = subprocess.run(["sh", str(script), *extra], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(_losses(tmp_path / "run")) == 2
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "tokenizer.model").is_file()
    assert "step 2/2" in (tmp_path / "run" / "training_log.txt").read_text()
    # the trainer's failure comes back through the `tee` into training_log.txt (a stand-in that exits 3)
    failing = tmp_path / "failing_python"
    failing.write_text("#!/bin/sh\nexit 3\n")
    failing.chmod(0o755)
    failed = subprocess.run(["sh", str(script)], env={**env, "PYTHON": str(failing)}, cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert failed.returncode == 3
