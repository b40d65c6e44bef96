"""GRPO learns, on the CPU in seconds: a tiny InternVL2.5 (2 layers, a 400-token vocabulary) that answers a random
digit rarely copies the digit its prompt shows; 80 GRPO steps with the `accuracy` reward (seconds on one core) make
it copy (three data seeds tried: 0.14-0.23 -> 0.96-0.97 in the last 5 steps), and the same seed gives the same reward
curve."""

import json
import random
from pathlib import Path

import pytest

from internvl_tune.data.config import DataConfig
from internvl_tune.models.internvl_chat.objectives import objective_section
from internvl_tune.models.internvl_chat.recipe import ModelArgs
from internvl_tune.train.config import RunConfig, TrainArgs

DIGITS = 5


def conversation(digit: int, answer: str | None = None) -> list[dict]:
    """The prompt shows the digit 8 times (so a 2-layer model sees it plainly); a short system turn."""
    turns = [{"from": "system", "value": "Copy the digit."}, {"from": "human", "value": " ".join([str(digit)] * 8)}]
    return turns + ([{"from": "gpt", "value": answer}] if answer is not None else [])


def write_meta(folder: Path, name: str, lines: list[dict]) -> Path:
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    meta = folder / f"{name}.json"
    meta.write_text(json.dumps({name: {"root": str(folder), "annotation": str(folder / f"{name}.jsonl")}}))
    return meta


def train(model: Path, meta: Path, out: Path, objective, steps: int, batch: int, lr: float, **model_flags):
    from internvl_tune.cli.train import recipe
    from internvl_tune.train.trainer import run

    cfg = RunConfig(
        model=ModelArgs(model_name_or_path=str(model), grad_checkpoint="False", freeze_backbone=True, **model_flags),
        data=DataConfig(meta_path=str(meta), conv_style="internvl2_5", max_seq_length=128),
        train=TrainArgs(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                        lr_scheduler_type="constant", dataloader_num_workers=0, report_to="none", save_strategy="no",
                        seed=0),
        objective=objective)
    run(recipe(cfg), cfg)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One thread, as the measure of "seconds on one core" (and no threads spinning against pytest-xdist's)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def guesser(tmp_path_factory, one_thread) -> tuple[Path, Path]:
    """A tiny model fine-tuned to answer a random digit (the answer never depends on the prompt), and the GRPO
    prompt lines whose `answer` is the digit shown."""
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("copy")
    base = write_tiny_checkpoint("internvl2_5-2b", folder / "base")
    rng = random.Random(0)
    sft = write_meta(folder, "guess", [{"conversations": conversation(rng.randrange(DIGITS), str(rng.randrange(DIGITS)))}
                                       for _ in range(64)])
    model = train(base, sft, folder / "guesser", objective_section()(objective="sft"), steps=40, batch=8, lr=3e-3)
    prompts = write_meta(folder, "copy", [{"conversations": conversation(i % DIGITS), "answer": str(i % DIGITS)}
                                          for i in range(40)])
    return model, prompts


def rewards(out: Path) -> list[float]:
    return [json.loads(line)["reward"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"reward"' in line]


def grpo():
    return objective_section()(objective="grpo", num_generations=8, max_completion_length=3, reward_funcs="accuracy")


def test_grpo_makes_a_guessing_model_copy_the_digit(guesser, tmp_path):
    model, prompts = guesser
    out = train(model, prompts, tmp_path / "grpo", grpo(), steps=80, batch=8, lr=2e-3, freeze_mlp=True)
    curve = rewards(out)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert first < 0.3 and last > 0.8, curve  # about 1 in 5 by chance, then copying
    again = train(model, prompts, tmp_path / "again", grpo(), steps=10, batch=8, lr=2e-3, freeze_mlp=True)
    assert rewards(again) == curve[:10]  # the same seed: the same completions, updates and rewards
