"""The benchmark code runs (tiny shape, CPU), and its command explains itself where it cannot run."""

import json
import math

import pytest
import torch

from internvl_tune.bench.common import synthetic_samples, train_flops
from internvl_tune.cli import main
from internvl_tune.dist.parallelize import compile_enabled


def test_our_training_path_runs_on_packed_synthetic_samples():
    from internvl_tune.bench.ours import run_ours

    samples = synthetic_samples(8, seed=0, tiles=(1, 2), text=(16, 64))
    row = run_ours("tiny", samples, torch.device("cpu"), warmup=1, packed_tokens=1024, steps=3)
    assert row["tokens_per_s"] > 0 and row["tflops"] > 0 and row["estimate_gib"] > 0
    # a freshly initialised model (weights of std 0.02) predicts its 1000 tokens almost uniformly, and three steps
    # at lr 1e-5 do not change that: the mean loss stays near log(1000)
    assert abs(row["loss_last"] - math.log(1000)) < 0.1, row["loss_last"]
    # packs of at most 1024 tokens: the waste is the share of their budget the samples leave empty, so the samples'
    # tokens over the used share is a whole number of packs, fewer than the samples and no fewer than the budget needs
    total = sum(s.tokens for s in samples)
    packs = total / ((1 - row["padding_waste"]) * 1024)
    assert abs(packs - round(packs)) < 1e-6 and math.ceil(total / 1024) <= round(packs) < len(samples), packs


def test_e2e_loader_only_times_the_trainers_loader_on_jpegs(tmp_path):
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--out", str(tmp_path), "--shape", "tiny", "--loader_only", "--workers", "0",
                 "--samples", "8", "--steps", "2", "--packed_tokens", "2048", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["packed_rows"] == 2 and row["loader_tokens_per_s"] > 0 and row["loader_samples_per_s"] > 0
    assert len(list((tmp_path / "data").glob("*.jpg"))) == 8


def test_flop_formula_counts_trained_frozen_and_attention_terms():
    base = train_flops(10, True, 0, 0, 100, 0, 1, 4, [100])
    assert base == 6 * 10 * 100 + 3 * 2 * 100 * 100 * 4
    assert train_flops(10, False, 0, 0, 100, 0, 1, 4, [100]) == base - 4 * 10 * 100  # frozen: forward only
    assert train_flops(10, True, 0, 0, 100, 0, 1, 4, [50, 50]) < base  # two short samples attend less


def test_bench_train_without_a_gpu_is_a_readable_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["bench", "train", "--shape", "tiny"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_bench_e2e_without_a_gpu_points_to_loader_only(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["bench", "e2e", "--out", str(tmp_path / "e2e")]) == 2
    assert "--loader_only" in capsys.readouterr().err and not (tmp_path / "e2e").exists()  # nothing written first


def test_bench_plot_help_and_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "plot", "--help"])
    assert stop.value.code == 0 and "bench_*.json" in capsys.readouterr().out
    row = {"shape": "internvl2-2b", "variant": "plain", "tokens_per_s": 1000.0, "mfu": 0.1, "peak_gib": 12.0}
    (tmp_path / "bench_2b.json").write_text(json.dumps([row]))
    assert main(["bench", "plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "throughput.png")
    assert (tmp_path / "throughput.png").stat().st_size > 0


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cuda", True), ("auto", "cpu", False), ("True", "cpu", True), ("False", "cuda", False),
])
def test_torch_compile_setting(setting, device, expected):
    assert compile_enabled(setting, torch.device(device)) is expected


def test_bench_train_alternates_ours_with_the_plain_loop(tmp_path, capsys):
    """`bench train`'s own code on the CPU (tiny shape): the plain row first, ours with its ratio and spread."""
    from internvl_tune.bench.train_throughput import main as bench_train

    out = tmp_path / "bench.json"
    assert bench_train(["--shape", "tiny", "--samples", "6", "--warmup", "1", "--steps", "1", "--packed_tokens", "512",
                        "--variants", "plain+lora4,ours+lora4", "--device", "cpu", "--out", str(out)]) == 0
    plain, ours = json.loads(out.read_text())
    assert plain["variant"].startswith("plain") and ours["variant"] == "ours + LoRA r4"
    assert plain["repeats"] == ours["repeats"] == 3
    assert ours["x_plain"] == pytest.approx(ours["tokens_per_s"] / plain["tokens_per_s"])
    assert "x plain (range)" in capsys.readouterr().out


def test_bench_train_refuses_fewer_than_three_rounds():
    from internvl_tune.bench.train_throughput import main as bench_train
    from internvl_tune.errors import UserError

    with pytest.raises(UserError, match="at least 3"):
        bench_train(["--shape", "tiny", "--repeats", "2", "--device", "cpu"])
