"""`internvl-tune bench verify`: the tiny run of every part on the CPU (what CI runs), the structure of verify.json
and verify.md, the exit status, time limits and skipped parts."""

from __future__ import annotations

import json

import pytest
import torch

from internvl_tune.bench import verify
from internvl_tune.bench.verify import PARTS, Part
from internvl_tune.cli import main

ENV_KEYS = {"device", "torch", "cuda", "transformers", "peft", "date", "commit"}


def _report(out):
    return json.loads((out / "verify.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `bench verify --tiny` of every part (in this process: the CPU shapes take seconds each)."""
    out = tmp_path_factory.mktemp("verify")
    code = main(["bench", "verify", "--tiny", "--out", str(out), "--commit", "abc1234"])
    return code, out


@pytest.mark.slow
def test_tiny_run_covers_every_part_and_passes(tiny_run):
    code, out = tiny_run
    report = _report(out)
    assert code == 0 == report["exit_code"], [(p["name"], p.get("error"), p["checks"]) for p in report["parts"]]
    assert [p["name"] for p in report["parts"]] == [p.name for p in PARTS]
    assert ENV_KEYS <= set(report["env"]) and report["env"]["commit"] == "abc1234"
    by_name = {p["name"]: p for p in report["parts"]}
    for p in report["parts"]:
        assert p["status"] == "ok" or (p["status"] == "skipped" and p["reason"]), p
        assert all(c["ok"] for c in p["checks"]), p["checks"]
    # every part that trains checks that its losses are finite
    for name in ("smoke", "lora8b", "full1b", "qlora76b", "preference", "full14b", "auto"):
        if by_name[name]["status"] == "ok":
            assert any("finite" in c["name"] for c in by_name[name]["checks"]), name


@pytest.mark.slow
def test_tiny_ratios_are_medians_of_alternated_rounds(tiny_run):
    _, out = tiny_run
    numbers = {p["name"]: p["numbers"] for p in _report(out)["parts"]}
    for name in ("lora8b", "full1b"):
        n = numbers[name]
        assert n["ours"]["repeats"] == n["plain"]["repeats"] >= 3
        assert n["ours"]["tokens_per_s_min"] <= n["ours"]["tokens_per_s"] <= n["ours"]["tokens_per_s_max"]
        assert n["x_plain"] == pytest.approx(n["ours"]["tokens_per_s"] / n["plain"]["tokens_per_s"])
        assert n["x_plain_min"] <= n["x_plain"] <= n["x_plain_max"]
    profile = numbers["lora8b"]["profile"]
    assert profile["phases"]["forward"]["ms"] > 0 and profile["phases"]["backward"]["ms"] > 0
    assert "matmul" in profile["share_by_kind"] and profile["top"]
    pref = numbers["preference"]
    assert pref["dpo"]["repeats"] == pref["mpo"]["repeats"] == pref["plain"]["repeats"] >= 3
    assert numbers["auto"]["picked"] == 1.0  # no GPU memory: every block, as the trainer decides on a CPU


@pytest.mark.slow
def test_tiny_internvl3_5_parts_run_their_families_against_the_plain_loop(tiny_run):
    """lora8b_35, moe30b and gptoss20b on the CPU: the tiny shape of each family (Qwen3, Qwen3-MoE, GPT-OSS), ours
    alternated with the plain loop, MFU and its target on the MoE part's active parameters."""
    _, out = tiny_run
    parts = {p["name"]: p for p in _report(out)["parts"]}
    for name, shape in (("lora8b_35", "tiny-qwen3"), ("moe30b", "tiny-qwen3-moe"), ("gptoss20b", "tiny-gpt-oss")):
        n = parts[name]["numbers"]
        assert parts[name]["status"] == "ok" and n["shape"] == shape and n["llm_layers"] == 2, name
        assert n["ours"]["repeats"] == n["plain"]["repeats"] >= 3 and n["ours"]["mfu"] > 0
        assert n["variant"] == "ours + ckpt True + LoRA r4"
    assert [t["name"] for t in parts["moe30b"]["targets"]][0] == "MFU (active parameters) >= 25%"


@pytest.mark.slow
def test_tiny_markdown_has_the_environment_and_a_row_per_part(tiny_run):
    _, out = tiny_run
    text = (out / "verify.md").read_text()
    for key in ("| device |", "| torch |", "| transformers |", "| peft |", "| date |", "| commit | abc1234 |"):
        assert key in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and (" | ok | " in line or " | skipped | " in line)]
    assert {row.split(" | ")[0].strip("| ") for row in rows} == {p.name for p in PARTS}
    assert "all checks passed (exit 0)" in text


def _fake_parts(monkeypatch, *entries):
    monkeypatch.setattr(verify, "PARTS", [Part(name, budget, f"verify_fakes:{name}", name) for name, budget in entries])


def test_a_failed_check_or_a_crash_exits_1_and_keeps_every_part(tmp_path, monkeypatch, capsys):
    _fake_parts(monkeypatch, ("passing", 30), ("failing", 30), ("crashing", 30), ("skipping", 30))
    assert main(["bench", "verify", "--tiny", "--out", str(tmp_path)]) == 1
    parts = {p["name"]: p for p in _report(tmp_path)["parts"]}
    assert {k: p["status"] for k, p in parts.items()} == {"passing": "ok", "failing": "failed", "crashing": "error",
                                                          "skipping": "skipped"}
    assert parts["passing"]["numbers"] == {"value": 1.5}
    assert parts["passing"]["targets"] == [{"name": "a goal that is missed", "met": None,  # tiny: says nothing
                                            "detail": "0 < 1; tiny shapes on the CPU"}]
    assert parts["failing"]["numbers"] == {"value": None}  # NaN is written as null: verify.json stays strict JSON
    assert parts["crashing"]["numbers"] == {"before_the_crash": 3} and "illegal memory access" in parts["crashing"]["error"]
    assert parts["skipping"]["reason"] == "needs a package that is not installed"
    text = (tmp_path / "verify.md").read_text()
    assert "FAILED (exit 1)" in text and "✘ loss finite" in text and "n/a: a goal that is missed" in text


def test_a_missed_target_alone_exits_0(tmp_path, monkeypatch):
    _fake_parts(monkeypatch, ("passing", 30), ("skipping", 30))
    assert main(["bench", "verify", "--tiny", "--out", str(tmp_path)]) == 0
    assert _report(tmp_path)["exit_code"] == 0


def test_a_part_whose_budget_does_not_fit_is_skipped_and_cheaper_ones_still_run(tmp_path, monkeypatch):
    _fake_parts(monkeypatch, ("passing", 5), ("failing", 1000), ("skipping", 5))
    assert main(["bench", "verify", "--tiny", "--out", str(tmp_path), "--budget_s", "100"]) == 0
    parts = {p["name"]: p for p in _report(tmp_path)["parts"]}
    assert parts["failing"]["status"] == "skipped" and "budget is gone" in parts["failing"]["reason"]
    assert parts["passing"]["status"] == "ok" and parts["skipping"]["status"] == "skipped"


def test_parts_run_in_the_order_given(tmp_path, monkeypatch):
    _fake_parts(monkeypatch, ("passing", 5), ("skipping", 5))
    main(["bench", "verify", "--tiny", "--out", str(tmp_path), "--parts", "skipping,passing"])
    assert [p["name"] for p in _report(tmp_path)["parts"]] == ["skipping", "passing"]


@pytest.mark.slow
def test_isolated_parts_are_stopped_at_their_limit_and_keep_what_they_recorded(tmp_path, monkeypatch):
    """Each part in its own process (as on a GPU): a part past its limit is killed with what it had recorded; a
    process that vanishes is an error; the others' results are unaffected."""
    _fake_parts(monkeypatch, ("sleeping", 10), ("dying", 60), ("passing", 60), ("failing", 60))
    assert main(["bench", "verify", "--tiny", "--isolate", "True", "--out", str(tmp_path)]) == 1
    parts = {p["name"]: p for p in _report(tmp_path)["parts"]}
    assert parts["sleeping"]["status"] == "timeout" and parts["sleeping"]["numbers"] == {"first_round": 42.0}
    assert parts["sleeping"]["seconds"] < 30
    assert parts["dying"]["status"] == "error" and "exited with code 3" in parts["dying"]["error"]
    assert parts["dying"]["numbers"] == {"started": True}
    assert parts["passing"]["status"] == "ok" and parts["passing"]["numbers"] == {"value": 1.5}
    assert parts["failing"]["status"] == "failed"
    assert (tmp_path / "logs" / "passing.log").is_file()


def test_unknown_parts_and_a_missing_gpu_are_readable_errors(tmp_path, capsys):
    assert main(["bench", "verify", "--tiny", "--out", str(tmp_path), "--parts", "peak,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown part(s) nope" in err and "lora8b" in err
    if not torch.cuda.is_available():
        assert main(["bench", "verify", "--out", str(tmp_path)]) == 2
        assert "--tiny" in capsys.readouterr().err


def test_a_scripts_run_is_one_table_entry(tmp_path, monkeypatch):
    """The ready form for a bench script's run(args) -> dict (e.g. a GRPO bench): parsed by its own parser, its
    losses checked, its numbers recorded; without a tiny form it is skipped on the CPU."""
    script = "internvl_tune.bench.verify_parts:script"
    monkeypatch.setattr(verify, "PARTS", [
        Part("grpo", 30, script, "a script", {"run": "verify_fakes:run", "tiny_argv": ["--steps", "3"]}),
        Part("grpo_bad", 30, script, "a script", {"run": "verify_fakes:run", "tiny_argv": ["--bad"]}),
        Part("grpo_gpu_only", 30, script, "a script", {"run": "verify_fakes:run", "argv": ["--steps", "9"]}),
    ])
    assert main(["bench", "verify", "--tiny", "--out", str(tmp_path)]) == 1
    parts = {p["name"]: p for p in _report(tmp_path)["parts"]}
    assert parts["grpo"]["status"] == "ok" and parts["grpo"]["numbers"]["losses"] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert "tokens_per_s 1,234" in parts["grpo"]["summary"]
    assert parts["grpo_bad"]["status"] == "failed"
    assert parts["grpo_gpu_only"]["status"] == "skipped" and "no tiny form" in parts["grpo_gpu_only"]["reason"]


def test_markdown_rows_show_checks_targets_and_why_a_part_stopped():
    report = {"env": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "commit": "abc"}, "budget_s": 540,
              "seconds": 530.4, "exit_code": 1, "parts": [
                  {"name": "lora8b", "status": "ok", "seconds": 120.2, "summary": "ours 9,581 tokens/s",
                   "checks": [{"name": "peak <= estimate + 15 %", "ok": True, "detail": "21.7 GiB"}],
                   "targets": [{"name": "MFU >= 45 %", "met": False, "detail": "39.7%"}]},
                  {"name": "preference", "status": "timeout", "seconds": 130.0, "summary": "DPO 1 tokens/s",
                   "reason": "stopped at its time limit of 130 s", "checks": [], "targets": []},
                  {"name": "auto", "status": "skipped", "reason": "the overall budget is gone", "seconds": 0.0}]}
    rows = verify.markdown(report).splitlines()
    assert "| result | FAILED (exit 1) |" in rows and "| budget | 540 s, used 530 s |" in rows
    assert "| lora8b | ok | 120 | ours 9,581 tokens/s | ✔ peak <= estimate + 15 % (21.7 GiB) | not met: MFU >= 45 % " \
           "(39.7%) |" in rows
    assert "| preference | timeout | 130 | DPO 1 tokens/s — stopped at its time limit of 130 s |  |  |" in rows
    assert "| auto | skipped | 0 | the overall budget is gone |  |  |" in rows
