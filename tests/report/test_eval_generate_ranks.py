"""--eval_generate with 2 gloo processes (FSDP over both): the ranks answer their shards in lockstep, nothing hangs,
and rank 0 writes every answer, in sample order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sample_meta import sample_meta

pytestmark = pytest.mark.slow


def _run(model: str, meta: str, out: str) -> list[str]:
    from internvl_tune.cli import main

    assert main(["train", "--model_name_or_path", model, "--meta_path", meta, "--eval_meta_path", meta,
                 "--output_dir", out, "--max_steps", "1", "--per_device_train_batch_size", "1", "--freeze_backbone",
                 "--freeze_llm", "--eval_steps", "1", "--save_strategy", "no", "--dataloader_num_workers", "0",
                 "--max_dynamic_patch", "1", "--report_to", "none", "--eval_generate", "3",
                 "--eval_generate_tokens", "6", "--device", "cpu"]) == 0
    return [json.loads(line)["id"] for line in (Path(out) / "eval_predictions/step-1.jsonl").read_text().splitlines()]


def test_two_ranks_answer_in_lockstep(tiny_model, tmp_path):
    from train_helpers import spawn

    meta = sample_meta(tmp_path, 1)  # one line of each kind: 4 validation samples
    two = spawn(2, _run, str(tiny_model), str(meta), str(tmp_path / "two"))
    # 3 of 4 spread evenly: indices round(k * 3 / 2) for k = 0, 1, 2 -> 0, 2, 3; rank 0 answers two, rank 1 one
    assert two == ["sample_text:1", "sample_multi_image:1", "sample_video:1"]
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_gen_anls" in r for r in rows)
