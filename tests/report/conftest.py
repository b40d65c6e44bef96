"""A tiny CPU training run with validation and --eval_generate, shared by the report tests (one run per session)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"


def sample_meta(tmp_path: Path, lines: int) -> Path:
    """The bundled meta JSON over the first ``lines`` lines of each of its four JSONL files (absolute paths)."""
    meta = json.loads((SAMPLE / "meta.json").read_text())
    for name, spec in meta.items():
        src = SAMPLE / spec["annotation"]
        dst = tmp_path / f"{name}.jsonl"
        dst.write_text("\n".join(src.read_text().splitlines()[:lines]) + "\n")
        spec.update(root=str(SAMPLE / spec["root"]), annotation=str(dst), repeat_time=1, length=lines)
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    return write_tiny_checkpoint("internvl2-1b", tmp_path_factory.mktemp("tiny") / "InternVL2-1B", image_size=56)


@pytest.fixture(scope="session")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    """4 LoRA steps on 8 samples (2 of each kind), validation + 4 generated answers at steps 2 and 4."""
    from internvl_tune.cli import main

    folder = tmp_path_factory.mktemp("report_run")
    meta = sample_meta(folder, 2)
    run_dir = folder / "tiny-run"
    rc = main(["train", "--model_name_or_path", str(tiny_model), "--meta_path", str(meta), "--eval_meta_path",
               str(meta), "--output_dir", str(run_dir), "--max_steps", "4", "--per_device_train_batch_size", "2",
               "--freeze_backbone", "--use_llm_lora", "4", "--unfreeze_lm_head", "--learning_rate", "5e-3",
               "--eval_steps", "2", "--save_steps", "4", "--dataloader_num_workers", "0", "--max_dynamic_patch", "2",
               "--report_to", "none", "--eval_generate", "4", "--eval_generate_tokens", "4", "--device", "cpu"])
    assert rc == 0
    return run_dir
