"""A tiny CPU training run with validation and --eval_generate, shared by the report tests (one run per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sample_meta import sample_meta, tiny_chat_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("tiny"))


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
