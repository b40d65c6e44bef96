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
        assert cfg.preference.objective == "mpo" and t.learning_rate == 2e-7 and d.max_seq_length == 16384
        assert not d.use_packed_ds and m.drop_path_rate == drop_path
    else:
        assert d.use_packed_ds and (d.max_packed_tokens, d.num_images_expected, d.loss_reduction) == (32768, 96, "square")
        assert d.max_seq_length == 32768 and cfg.preference.objective == "sft"
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
    assert f"({family}), template internvl2_5" in log and f"done: {steps} steps" in log
    assert "Warning" not in proc.stdout and (out / "config.json").is_file()
    assert ("packed rows" in log) == ("mpo" not in script) and ("objective mpo" in log) == ("mpo" in script)
    assert (out / "adapter").is_dir() == ("lora" in script)
