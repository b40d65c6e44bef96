"""`internvl-tune bench grpo --tiny`: the GRPO rollout benchmark runs on the CPU (the GPU numbers come from the same
code), and `run(args)` gives `bench verify` its numbers."""

import json
import math
import warnings

import pytest
import torch

from internvl_tune.cli import main


def test_tiny_bench_compares_generators_and_splits_the_step(tmp_path, capsys):
    out = tmp_path / "grpo.json"
    with warnings.catch_warnings():  # our generation names the cache as this transformers wants it, even through
        warnings.simplefilter("error", FutureWarning)  # the eager checkpoint wrappers of the update's blocks
        assert main(["bench", "grpo", "--tiny", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["shape"] == "tiny" and row["num_generations"] == 4 and row["completion_tokens"] == 8
    assert row["ours_tokens_per_s"] > 0 and row["transformers_tokens_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["transformers_s"] / row["ours_s"])
    assert 0 < row["generation_share"] < 1 and all(math.isfinite(x) for x in row["losses"])
    assert "rollout tokens/s ours" in capsys.readouterr().out


def test_run_refuses_a_missing_gpu_clearly():
    from internvl_tune.bench.grpo import build_parser, run
    from internvl_tune.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UserError, match="needs a CUDA device; none is visible here .--tiny"):
        run(build_parser().parse_args(["--shape", "tiny"]))


def test_the_bench_model_keeps_its_rotary_frequencies():
    # to_empty() leaves every buffer uninitialised: the rotary frequencies must be those of a model built normally
    # (garbage there gave NaN probabilities in transformers' generate now and then)
    from internvl_tune.bench.grpo import build_chat
    from internvl_tune.bench.grpo import native_config as bench_config
    from internvl_tune.models.internvl_chat.loading import build_empty_model

    chat = build_chat("tiny", torch.device("cpu"), torch.float32)
    reference = dict(build_empty_model(bench_config("tiny")).named_buffers())
    buffers = dict(chat.model.named_buffers())
    assert buffers and buffers.keys() == reference.keys()
    assert all(torch.equal(buffers[k].float(), reference[k].float()) for k in buffers)
