"""Compiled preference tuning keeps a fixed, small set of graphs: the reference pass (no grad, eval mode, LoRA
adapters off, or the frozen copy) adds its graphs on the first step and nothing is compiled again afterwards, across
an epoch boundary.

Dynamo decides to recompile from its guards before any backend runs, so the count does not depend on the backend;
the fast tests compile with the ``eager`` backend (tracing only), one slow test with inductor as training does."""

from pathlib import Path

import pytest
import torch

from internvl_tune.data.config import DataConfig
from internvl_tune.models.internvl_chat.objectives import objective_section
from internvl_tune.models.internvl_chat.recipe import ModelArgs
from internvl_tune.train.config import RunConfig, TrainArgs

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"
COMPILE = torch.nn.Module.compile
LORA = dict(use_llm_lora=4, freeze_mlp=True)


def _step_runner_call():
    from internvl_tune.train.step import StepRunner

    return StepRunner.__call__


STEP = _step_runner_call()


def graphs_per_step(monkeypatch, tiny, out, objective: str, model_flags: dict, backend: str = "eager",
                    steps: int = 4, **objective_flags) -> list[int]:
    """Train ``steps`` compiled steps (3 per epoch) and return dynamo's count of compiled graphs after each."""
    from torch._dynamo.utils import counters

    from internvl_tune.cli.train import recipe
    from internvl_tune.train import step as step_module
    from internvl_tune.train.trainer import run

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: COMPILE(self, backend=backend, **kw))
    seen = []

    def counted(self, *args, **kwargs):
        pending = STEP(self, *args, **kwargs)
        seen.append(counters["stats"]["unique_graphs"])
        return pending

    monkeypatch.setattr(step_module.StepRunner, "__call__", counted)
    torch._dynamo.reset()
    counters.clear()
    meta = SAMPLE / {"sft": "meta.json", "grpo": "prompts_meta.json"}.get(objective, "preference_meta.json")
    cfg = RunConfig(
        model=ModelArgs(model_name_or_path=str(tiny), grad_checkpoint="True", freeze_backbone=True, **model_flags),
        data=DataConfig(meta_path=str(meta), conv_style="Hermes-2", force_image_size=56, dynamic_image_size=True,
                        max_dynamic_patch=2, max_seq_length=400),
        train=TrainArgs(output_dir=str(out), max_steps=steps, save_steps=100, per_device_train_batch_size=2,
                        learning_rate=1e-3, dataloader_num_workers=0, report_to="none", torch_compile="True"),
        objective=objective_section()(objective=objective, **objective_flags),
    )
    if objective == "sft":
        cfg.data.meta_path = str(_text_image_meta(out.parent))
    run(recipe(cfg), cfg)
    torch._dynamo.reset()
    return seen


def _text_image_meta(folder: Path) -> Path:
    import json

    meta = json.loads((SAMPLE / "meta.json").read_text())
    keep = {k: {**v, "root": str(SAMPLE / v["root"]), "annotation": str(SAMPLE / v["annotation"])}
            for k, v in meta.items() if k in ("sample_image", "sample_text")}
    path = folder / "sft_meta.json"
    path.write_text(json.dumps(keep))
    return path


def test_lora_dpo_compiles_its_reference_pass_once(monkeypatch, tiny_1b, tmp_path):
    sft = graphs_per_step(monkeypatch, tiny_1b, tmp_path / "sft", "sft", LORA, steps=2)
    dpo = graphs_per_step(monkeypatch, tiny_1b, tmp_path / "dpo", "dpo", LORA)
    assert sft[0] == sft[-1] and dpo == [dpo[0]] * 4, (sft, dpo)  # nothing new after the first step
    # the reference pass adds at most one graph per graph of training (ViT, first LLM layer, other LLM layers)
    assert sft[0] < dpo[0] <= 2 * sft[0], (sft, dpo)


def test_grpo_rollouts_add_no_graph_and_its_reference_pass_one_set(monkeypatch, tiny_1b, tmp_path):
    # generation runs past the per-block graphs; the update and the reference pass (--beta) compile on step 1
    grpo = graphs_per_step(monkeypatch, tiny_1b, tmp_path / "grpo", "grpo", LORA, steps=3, num_generations=2,
                           max_completion_length=3, beta=0.1)
    assert grpo == [grpo[0]] * 3 and grpo[0] <= 6, grpo


@pytest.mark.slow
def test_mpo_with_a_frozen_copy_compiles_once(monkeypatch, tiny_1b, tmp_path):
    mpo = graphs_per_step(monkeypatch, tiny_1b, tmp_path / "mpo", "mpo", {})
    assert mpo == [mpo[0]] * 4, mpo


@pytest.mark.slow
def test_lora_dpo_with_inductor_compiles_once(monkeypatch, tiny_1b, tmp_path):
    dpo = graphs_per_step(monkeypatch, tiny_1b, tmp_path / "dpo", "dpo", LORA, backend="inductor", steps=3)
    assert dpo == [dpo[0]] * 3, dpo
