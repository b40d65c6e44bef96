"""The reference launch scripts run unchanged on CPU against a tiny model of their family (env overrides only)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "shell" / "internvl2.0" / "2nd_finetune"
SCRIPTS_2_5 = REPO / "shell" / "internvl2.5" / "2nd_finetune"


@pytest.mark.slow
@pytest.mark.parametrize("script, like", [
    (SCRIPTS / "internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_lora.sh", "internvl2-1b"),
    (SCRIPTS / "internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune_full.sh", "internvl2-2b"),
    (SCRIPTS_2_5 / "internvl2_5_8b_dynamic_res_2nd_finetune_lora.sh", "internvl2_5-8b"),
], ids=lambda v: getattr(v, "name", v))
def test_script_trains_and_exports_a_tiny_model(tmp_path, script, like):
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    model = write_tiny_checkpoint(like, tmp_path / "model")
    out = tmp_path / "run"
    env = {**os.environ, "GPUS": "1", "PYTHON": sys.executable, "MODEL": str(model), "OUTPUT_DIR": str(out),
           "MASTER_PORT": str(29000 + os.getpid() % 1000), "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["sh", str(script), "--bf16", "False", "--max_steps", "2", "--force_image_size",
                           "56", "--max_dynamic_patch", "2", "--dataloader_num_workers", "0", "--report_to", "none",
                           "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (out / "config.json").is_file() and (out / "training_log.txt").is_file()
    # no third-party noise on a start (FutureWarnings, tokenizer regex guesses): the log holds only what we print
    assert "Warning" not in proc.stdout and "warn" not in proc.stdout.lower(), proc.stdout[-3000:]
    assert "global batch: 16" in proc.stdout or "global batch: 128" in proc.stdout
    run_config = (out / "config.yaml").read_text()  # the reference's settings of the release's series
    series = {"max_seq_length: 8192", "conv_style: internvl2_5"} if "2_5" in like else {"max_seq_length: 4096"}
    assert all(line in run_config for line in series), run_config


def test_a_failing_run_returns_its_exit_status(tmp_path):
    env = {**os.environ, "GPUS": "1", "PYTHON": sys.executable, "MODEL": str(tmp_path / "missing"),
           "OUTPUT_DIR": str(tmp_path / "run"), "PYTHONPATH": str(REPO / "src"), "MASTER_PORT": "29999"}
    proc = subprocess.run(["sh", str(SCRIPTS / "internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_lora.sh"),
                           "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "not a directory" in proc.stdout


@pytest.mark.parametrize("script", sorted((REPO / "shell").rglob("*.sh")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_sourced_file_exists(script):
    """A script that sources a moved or renamed helper fails at its first line on the user's cluster."""
    import re

    for target in re.findall(r'^\s*\. "\$\(dirname "\$0"\)/([^"]+)"', script.read_text(), flags=re.M):
        assert (script.parent / target).is_file(), f"{script.relative_to(REPO)} sources missing {target}"


# ------------------------------------------------------------------------------------------------------ InternVL3.5
SCRIPTS_3_5 = REPO / "shell" / "internvl3.5"
SIZES_3_5 = {"1b": ("1B", 0.0), "2b": ("2B", 0.0), "4b": ("4B", 0.0), "8b": ("8B", 0.1), "14b": ("14B", 0.1),
             "38b": ("38B", 0.4), "30b": ("30B-A3B", 0.1), "241b": ("241B-A28B", 0.4)}  # drop_path_rate per size
SFT_LR_3_5 = {"241b": 2e-5}  # the reference's SFT learning rate where it is not 8e-5


def _torchrun_argv(script: Path, tmp_path: Path, **env) -> list[str]:
    """The command line the script hands to python (a stand-in records it instead of starting torchrun)."""
    record = tmp_path / "argv.txt"
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGV_FILE"\n')
    stand_in.chmod(0o755)
    proc = subprocess.run(["sh", str(script), "--max_steps", "3"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(stand_in), "ARGV_FILE": str(record), **env}, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return record.read_text().splitlines()


@pytest.mark.parametrize("script", sorted(SCRIPTS_3_5.glob("internvl3_5_*.sh")), ids=lambda p: p.name)
def test_internvl3_5_scripts_pass_the_reference_settings(script, tmp_path):
    """Each script, on two 8-GPU nodes as the reference runs it: torchrun's node arguments, and the flags `internvl-tune
    train` parses into the reference's settings (every flag of the reference script accepted)."""
    from internvl_tune.cli import build_parser
    from internvl_tune.cli.train import sections
    from internvl_tune.train.config import load_config

    size, kind = re.match(r"internvl3_5_(\d+b)_(\w+)\.sh", script.name).groups()
    argv = _torchrun_argv(script, tmp_path, NPROC_PER_NODE="8", WORLD_SIZE="2", RANK="1", MASTER_ADDR="10.0.0.1")
    split = argv.index("internvl_tune.cli")
    assert argv[:split - 1] == ["-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1",
                                "--nproc_per_node=8", "--master_port=34229"]
    cfg = load_config(build_parser(argv[split + 1:]).parse_args(argv[split + 1:]), sections())
    name, drop_path = SIZES_3_5[size]
    release = {"sft": f"InternVL3_5-{name}-Pretrained", "mpo": f"InternVL3_5-{name}-Instruct",
               "sft_lora": f"InternVL3_5-{name}"}[kind]
    m, d, t = cfg.model, cfg.data, cfg.train
    assert m.model_name_or_path == f"./pretrained/{release}" and d.conv_style == "internvl2_5"
    assert t.output_dir == f"work_dirs/internvl3_5_{size}_{kind}/internvl3_5_{size}_{kind}" and t.max_steps == 3
    assert (d.force_image_size, d.max_dynamic_patch, d.dynamic_image_size, d.use_thumbnail) == (448, 12, True, True)
    batch = {"sft": 512, "mpo": 256, "sft_lora": 16}[kind]
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps * 16 == batch
    if kind == "mpo":
        assert cfg.objective.objective == "mpo" and t.learning_rate == 2e-7 and d.max_seq_length == 16384
        assert not d.use_packed_ds and m.drop_path_rate == drop_path
    else:
        assert d.use_packed_ds and (d.max_packed_tokens, d.num_images_expected, d.loss_reduction) == (32768, 96, "square")
        assert d.max_seq_length == 32768 and cfg.objective.objective == "sft"
    if kind == "sft":
        assert (t.learning_rate, m.drop_path_rate, m.use_llm_lora, m.freeze_llm) == \
            (SFT_LR_3_5.get(size, 8e-5), drop_path, 0, False)
        assert (m.moe_experts, m.moe_router) == ("auto", "auto")  # MoE: experts and routers train, as the reference
    if kind == "sft_lora":
        assert (m.use_llm_lora, m.freeze_llm, m.freeze_backbone, m.freeze_mlp) == (16, True, True, True)
        assert (t.learning_rate, t.num_train_epochs, m.drop_path_rate) == (4e-5, 1, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("script, steps", [("internvl3_5_8b_sft.sh", 2), ("internvl3_5_1b_sft_lora.sh", 1),
                                           ("internvl3_5_38b_mpo.sh", 1), ("internvl3_5_30b_sft.sh", 1),
                                           ("internvl3_5_241b_sft_lora.sh", 1)])
def test_internvl3_5_scripts_train_a_tiny_model(script, steps, tmp_path):
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    size = script.split("_")[2]
    like = "internvl3_5-" + {"30b": "30b-a3b", "241b": "241b-a28b"}.get(size, size)
    model = write_tiny_checkpoint(like, tmp_path / "model")
    out = tmp_path / "run"
    meta = REPO / "examples" / "sample" / ("preference_meta.json" if "mpo" in script else "meta.json")
    env = {**os.environ, "NPROC_PER_NODE": "1", "BATCH_SIZE": "2", "PYTHON": sys.executable, "MODEL": str(model),
           "OUTPUT_DIR": str(out), "META_PATH": str(meta), "MASTER_PORT": str(29000 + os.getpid() % 1000),
           "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["sh", str(SCRIPTS_3_5 / script), "--bf16", "False", "--max_steps", str(steps),
                           "--force_image_size", "56", "--max_dynamic_patch", "2", "--max_packed_tokens", "1024",
                           "--dataloader_num_workers", "0", "--report_to", "none", "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout[-3000:]
    family = "qwen3_moe" if size in ("30b", "241b") else "qwen3"
    assert f"({family})" in log and "template internvl2_5" in log and f"done: {steps} steps" in log
    assert "Warning" not in proc.stdout and (out / "config.json").is_file()
    assert ("packed rows" in log) == ("mpo" not in script) and ("objective mpo" in log) == ("mpo" in script)
    assert (out / "adapter").is_dir() == ("lora" in script)


# ------------------------------------------------------------------------------------------- InternVL3.5-GPT-OSS
SCRIPTS_GPT_OSS = REPO / "shell" / "internvl3.5_gpt_oss"
# the reference's settings of each stage: (learning rate, max_steps, global batch, trained parts, seed)
GPT_OSS_STAGES = {
    "stage0_mlp_warmup": (1e-3, 5000, 256, "projector", 22110),
    "stage1_pretrain": (2e-5, 15000, 512, "all", 42),
    "stage2_sft": (8e-5, 8000, 512, "all", 42),
    "stage3_mpo": (2e-7, -1, 256, "all", 42),
    "sft_lora": (4e-5, -1, 16, "lora", 42),
}


@pytest.mark.parametrize("stage", list(GPT_OSS_STAGES))
def test_gpt_oss_scripts_pass_the_reference_settings(stage, tmp_path):
    """The GPT-OSS stages, on two 8-GPU nodes: the harmony template, each stage's model (stage 0: the ViT and LLM it
    builds the model from), learning rate, steps, batch, what trains and seed, as the reference's scripts."""
    from internvl_tune.cli import build_parser
    from internvl_tune.cli.train import sections
    from internvl_tune.train.config import load_config

    script = SCRIPTS_GPT_OSS / f"internvl3_5_gpt_oss_20b_{stage}.sh"
    argv = _torchrun_argv(script, tmp_path, NPROC_PER_NODE="8", WORLD_SIZE="2", RANK="0", MASTER_ADDR="10.0.0.1",
                          MODEL="")
    args = argv[argv.index("internvl_tune.cli") + 1:-2]  # without the test's own --max_steps 3
    cfg = load_config(build_parser(args).parse_args(args), sections())
    m, d, t = cfg.model, cfg.data, cfg.train
    lr, steps, batch, trains, seed = GPT_OSS_STAGES[stage]
    assert d.conv_style == "internvl3_5_gpt_oss" and (t.learning_rate, t.max_steps, t.seed) == (lr, steps, seed)
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps * 16 == batch
    models = {"stage0_mlp_warmup": None,
              "stage1_pretrain": "work_dirs/internvl3_5_gpt_oss_20b_pretrain/internvl3_5_gpt_oss_20b_stage0_mlp_warmup",
              "stage2_sft": "work_dirs/internvl3_5_gpt_oss_20b_pretrain/internvl3_5_gpt_oss_20b_stage1_pretrain",
              "stage3_mpo": "work_dirs/internvl3_5_gpt_oss_20b_sft/internvl3_5_gpt_oss_20b_stage2_sft",
              "sft_lora": "./pretrained/InternVL3_5-GPT-OSS-20B-A4B-Preview"}
    assert m.model_name_or_path == models[stage]
    if stage == "stage0_mlp_warmup":
        assert (m.vision_path, m.llm_path) == ("./pretrained/InternViT-300M-448px-V2_5", "./pretrained/gpt-oss-20b")
        assert (d.max_seq_length, t.warmup_ratio, t.save_total_limit) == (16384, 0.01, 20)
    frozen = {"projector": (True, True, False), "all": (False, False, False), "lora": (True, True, True)}[trains]
    assert (m.freeze_llm, m.freeze_backbone, m.freeze_mlp) == frozen and (m.use_llm_lora == 16) == (trains == "lora")
    assert (cfg.objective.objective == "mpo") == (stage == "stage3_mpo") and d.use_packed_ds == (stage != "stage3_mpo")
    assert t.output_dir.endswith(f"/internvl3_5_gpt_oss_20b_{stage}")


def _run_script(script: Path, tmp_path: Path, out: Path, steps: int = 1, **env) -> str:
    meta = REPO / "examples" / "sample" / ("preference_meta.json" if "mpo" in script.name else "meta.json")
    env = {**os.environ, "NPROC_PER_NODE": "1", "BATCH_SIZE": "2", "PYTHON": sys.executable, "OUTPUT_DIR": str(out),
           "META_PATH": str(meta), "MASTER_PORT": str(29000 + os.getpid() % 1000), "PYTHONPATH": str(REPO / "src"),
           "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run(["sh", str(script), "--bf16", "False", "--max_steps", str(steps), "--force_image_size", "56",
                           "--max_dynamic_patch", "2", "--max_packed_tokens", "1024", "--dataloader_num_workers", "0",
                           "--report_to", "none", "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Warning" not in proc.stdout and (out / "config.json").is_file()
    return " ".join(proc.stdout.split())


@pytest.mark.slow
def test_gpt_oss_stages_0_and_1_build_a_model_from_parts_and_train_it(tmp_path):
    """Stage 0 builds the model from a tiny InternViT and a tiny gpt-oss (MXFP4 experts, no InternVL tokens) and
    trains only its new projector; stage 1 trains everything from stage 0's output."""
    import torch
    from chat_helpers import write_tiny_parts
    from safetensors.torch import load_file

    _, vit, llm = write_tiny_parts("internvl3_5-gpt-oss-20b-a4b", tmp_path / "parts", mxfp4_experts=True)
    stage0 = tmp_path / "stage0"
    log = _run_script(SCRIPTS_GPT_OSS / "internvl3_5_gpt_oss_20b_stage0_mlp_warmup.sh", tmp_path, stage0, steps=2,
                      VISION_PATH=str(vit), LLM_PATH=str(llm))  # 2 steps: the first one's warm-up rate is 0
    assert f"building the model from parts: ViT {vit} + LLM {llm} + projector (new)" in log
    assert "(gpt_oss), experts frozen (grouped), routers frozen, load-balancing loss x 0.9" in log
    assert "template internvl3_5_gpt_oss" in log and "done: 2 steps" in log
    initial, trained = load_file(str(stage0 / "initial_model" / "model.safetensors")), {}
    assert not any(k.endswith("_blocks") for k in initial)  # gpt-oss's MXFP4 experts, dequantized
    for file in stage0.glob("model*.safetensors"):
        trained.update(load_file(str(file)))
    changed = {k for k in initial if not torch.equal(initial[k].float(), trained[k].float())}
    assert changed == {f"mlp1.{i}.{w}" for i in (0, 1, 3) for w in ("weight", "bias")}  # only the projector trained
    log = _run_script(SCRIPTS_GPT_OSS / "internvl3_5_gpt_oss_20b_stage1_pretrain.sh", tmp_path, tmp_path / "stage1",
                      MODEL=str(stage0))
    assert "(gpt_oss), experts train (grouped), routers train, load-balancing loss x 0.9" in log
    assert "done: 1 steps" in log


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage3_mpo", "sft_lora"])  # stage 2 runs as stage 1 does
def test_gpt_oss_scripts_train_a_tiny_model(stage, tmp_path):
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    model = write_tiny_checkpoint("internvl3_5-gpt-oss-20b-a4b", tmp_path / "model")
    out = tmp_path / "run"
    log = _run_script(SCRIPTS_GPT_OSS / f"internvl3_5_gpt_oss_20b_{stage}.sh", tmp_path, out, MODEL=str(model))
    assert "(gpt_oss)" in log and "template internvl3_5_gpt_oss" in log and "done: 1 steps" in log
    assert ("objective mpo" in log) == (stage == "stage3_mpo") and (out / "adapter").is_dir() == (stage == "sft_lora")
