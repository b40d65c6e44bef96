"""The reference launch scripts run unchanged on CPU against a tiny model of their family (env overrides only)."""

import os
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
