"""Read the reference fixtures (``tests/fixtures/reference``, written by ``tools/make_reference_fixtures.py``).

Each fixture is a tiny checkpoint the reference InternVL code saved, plus what the reference computed from it on
fixed inputs: ``NAME.json`` (token inputs, losses, generated tokens) and ``NAME.safetensors`` (logits, features,
embeddings). ``manifest.json`` lists them with the reference commit, library versions and the tolerance.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent / "fixtures" / "reference"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
TOLERANCE = MANIFEST["tolerance"]


def names(kind: str) -> list[str]:
    """The fixtures of one kind: ``chat`` (InternVLChatModel) or ``cg`` (InternVL-C/G)."""
    return sorted(name for name, entry in MANIFEST["fixtures"].items() if entry["kind"] == kind)


def checkpoint(name: str) -> Path:
    return ROOT / name


@functools.cache
def expected(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the JSON record, the tensors) the reference produced for fixture ``name``."""
    return json.loads((ROOT / f"{name}.json").read_text()), load_file(str(ROOT / f"{name}.safetensors"))


@functools.cache
def inputs() -> dict[str, torch.Tensor]:
    return load_file(str(ROOT / "inputs.safetensors"))


def assert_close(actual: torch.Tensor, wanted: torch.Tensor, what: str) -> None:
    """Within the fixtures' tolerance (absolute, fp32); the message says the largest difference."""
    actual = actual.detach().float().reshape(wanted.shape)
    diff = (actual - wanted).abs().max().item()
    assert diff <= TOLERANCE, f"{what}: max |ours - reference| = {diff:.3g} > {TOLERANCE}"


class RecordGradients(torch.optim.Optimizer):
    """An optimizer whose step records the gradients it is given, by parameter name, and changes nothing (what the
    training step hands the optimizer, read without a real update)."""

    def __init__(self, named_parameters):
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        super().__init__([p for _, p in named], {"lr": 1.0})
        self.names = {id(p): n for n, p in named}
        self.grads: list[dict[str, torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append({self.names[id(p)]: p.grad.detach().clone() for group in self.param_groups
                           for p in group["params"] if p.grad is not None})


def until_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    """Generated rows cut after their first end token (what follows is padding, whose id is not part of fidelity)."""
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]
