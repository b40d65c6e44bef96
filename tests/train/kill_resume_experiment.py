"""Kill/resume experiment: SIGKILL a training run at random moments (loading, training, saving) again and again,
resume each time with ``--resume_from_checkpoint auto``, and compare the final loss curve with an uninterrupted run.

Run:  ``.venv/bin/python tests/train/kill_resume_experiment.py --kills 12 --seed 0``
The pytest suite runs the short version (``test_kill_resume_experiment``); docs/reliability.md records a long one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))


def _cmd(model: Path, meta: Path, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "internvl_tune.cli", "train", "--model_name_or_path", str(model), "--meta_path",
           str(meta), "--output_dir", str(out), "--conv_style", "Hermes-2", "--force_image_size", "56",
           "--dynamic_image_size", "--max_dynamic_patch", "4", "--per_device_train_batch_size", "2",
           "--learning_rate", "1e-3", "--dataloader_num_workers", "0", "--report_to", "none", "--grad_checkpoint",
           "False", "--freeze_backbone", "--use_llm_lora", "4", "--unfreeze_lm_head", "--max_steps", "12",
           "--save_steps", "2", "--save_total_limit", "2"]
    return cmd + (["--resume_from_checkpoint", "auto"] if resume else ["--overwrite_output_dir"])


def _losses(out: Path) -> list[float]:
    from internvl_tune.train.metrics import read_jsonl

    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def experiment(workdir: Path, kills: int, seed: int, max_delay: float = 12.0) -> dict:
    """Returns the reference losses, the final losses after ``kills`` SIGKILLs, and the kill delays used."""
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint
    from internvl_tune.train.checkpoint import list_checkpoints

    model = write_tiny_checkpoint("internvl2-1b", workdir / "tiny")
    sample = REPO / "examples" / "sample"
    meta = json.loads((sample / "meta.json").read_text())
    spec = meta["sample_image"]
    meta = {"img": {**spec, "root": str(sample / spec["root"]), "annotation": str(sample / spec["annotation"])}}
    meta_path = workdir / "meta.json"
    meta_path.write_text(json.dumps(meta))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run(_cmd(model, meta_path, workdir / "ref", False), env=env, check=True, capture_output=True)
    reference = _losses(workdir / "ref")
    rng = random.Random(seed)
    out = workdir / "run"
    delays, killed = [], 0
    while True:
        resume = bool(list_checkpoints(out))
        proc = subprocess.Popen(_cmd(model, meta_path, out, resume), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if killed < kills:
            delay = rng.uniform(0.5, max_delay)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed += 1
                delays.append(round(delay, 2))
                continue
        if proc.wait() == 0 and (out / "config.json").exists():
            break
    return {"reference": reference, "resumed": _losses(out), "kill_delays_s": delays,
            "identical": reference == _losses(out)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        result = experiment(Path(tmp), args.kills, args.seed)
        result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result, indent=1))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
