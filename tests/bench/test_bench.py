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


def test_the_qwen3_shape_runs_our_training_path():
    """InternVL3.5's LLM (Qwen3: q/k-norm, head_dim apart from hidden / heads) through the packed training path."""
    from internvl_tune.bench.ours import run_ours

    samples = synthetic_samples(4, seed=0, tiles=(1, 2), text=(16, 64))
    row = run_ours("tiny-qwen3", samples, torch.device("cpu"), warmup=1, packed_tokens=1024, steps=2)
    assert row["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(row["loss_last"]))


def test_attention_flops_use_heads_times_head_dim():
    from internvl_tune.bench.common import SyntheticSample, step_flops
    from internvl_tune.bench.shapes import native_config

    cfg = native_config("internvl3_5-4b")  # Qwen3-4B: hidden 2560, 32 heads x 128 = 4096 wide attention
    sample = SyntheticSample(tiles=0, text=1000)
    no_params = {"llm": 0, "vit": 0, "proj": 0}
    assert step_flops(no_params, cfg.text_config, [sample]) == 3 * 2 * 1000 * 1000 * 4096 * 36


def test_bench_train_lists_the_internvl3_5_shapes(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "train", "--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(f"internvl3_5-{size}" in out for size in ("1b", "8b", "38b"))


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


@pytest.mark.parametrize("shape", ["tiny-qwen3-moe", "tiny-gpt-oss"])
def test_the_moe_shapes_run_our_training_path_with_lora_on_the_experts(shape):
    """InternVL3.5-30B-A3B's and GPT-OSS-20B-A4B's LLMs, tiny: grouped experts, expert LoRA, sinks and windows in the
    packed path; the MFU counts active parameters only."""
    from internvl_tune.bench.ours import run_ours

    samples = synthetic_samples(4, seed=0, tiles=(1, 2), text=(16, 64))
    row = run_ours(shape, samples, torch.device("cpu"), warmup=1, packed_tokens=1024, steps=2, lora_rank=4)
    assert row["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(row["loss_last"]))


def test_moe_flops_count_the_active_experts():
    """Each token runs 8 of Qwen3-30B-A3B's 128 experts: the LLM counts about 3.3B parameters (its name's A3B), not
    30.5B; written out from the published widths."""
    from transformers import InternVLForConditionalGeneration

    from internvl_tune.bench.common import param_counts
    from internvl_tune.bench.shapes import native_config

    cfg = native_config("internvl3_5-30b-a3b")
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(cfg)
    hidden, layers, vocab = 2048, 48, 151678
    attention = hidden * 32 * 128 * 2 + hidden * 4 * 128 * 2 + 2 * 128  # q, o; k, v; q/k norms
    experts = 3 * hidden * 768  # gate, up, down of one expert
    per_layer = attention + 2 * hidden + 128 * hidden + 8 * experts  # norms, router, 8 active experts
    assert param_counts(model)["llm"] == layers * per_layer + hidden + vocab * hidden  # final norm, LM head


@pytest.mark.parametrize("shape", ["tiny-qwen3", "tiny-qwen3-moe", "tiny-gpt-oss"])
def test_the_plain_loop_trains_the_internvl3_5_shapes_with_peft(shape):
    """The baseline on InternVL3.5's LLMs: peft LoRA on the attention and MLP linears, and for a mixture of experts
    on transformers' own grouped experts too (peft's target_parameters, no dropout), every LoRA matrix trained."""
    from internvl_tune.bench.common import synthetic_samples
    from internvl_tune.bench.plain import PlainLoop

    samples = synthetic_samples(2, seed=0, tiles=(1, 1), text=(16, 32))
    loop = PlainLoop(shape, samples, torch.device("cpu"), lora_rank=4, grad_checkpoint=True)
    trained = [n for n, p in loop.model.named_parameters() if p.requires_grad]
    experts = [n for n in trained if ".mlp.experts." in n]
    assert all("lora_" in n for n in trained)
    assert len(experts) == (0 if shape == "tiny-qwen3" else 2 * 2 * 2)  # 2 layers x gate_up / down x A / B
    assert any(".mlp.gate_proj.lora_A" in n for n in trained) == (shape == "tiny-qwen3")
    if experts:
        assert loop.model.base_model.model.model.language_model.config._experts_implementation == "grouped_mm"
    tokens, flops, loss, count = loop._steps([0, 1])
    assert count == 2 and math.isfinite(loss) and flops > 0
    assert all(p.grad is None for p in loop.model.parameters())  # the step zeroed what it trained


def test_bench_train_cuts_the_llm_to_llm_layers(tmp_path):
    """--llm_layers: both loops run that many of the LLM's layers (a MoE shape twice on one GPU)."""
    from internvl_tune.bench.train_throughput import main as bench_train

    out = tmp_path / "bench.json"
    assert bench_train(["--shape", "tiny-gpt-oss", "--samples", "4", "--warmup", "1", "--steps", "1",
                        "--packed_tokens", "512", "--variants", "plain+lora4,ours+lora4", "--llm_layers", "1",
                        "--device", "cpu", "--out", str(out)]) == 0
    plain, ours = json.loads(out.read_text())
    assert plain["llm_layers"] == ours["llm_layers"] == 1 and ours["x_plain"] > 0
    from internvl_tune.bench.shapes import native_config

    assert native_config("internvl3_5-30b-a3b", llm_layers=12).text_config.num_hidden_layers == 12
    with pytest.raises(ValueError, match="has 48 LLM layers, not 49"):
        native_config("internvl3_5-30b-a3b", llm_layers=49)
