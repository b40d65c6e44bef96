"""Rewards of online RL (``--reward_funcs``): built-in verifiers for vision tasks and the user's own functions.

A reward function is plain Python, called once per micro-batch with every completion of it (trl's convention)::

    def my_reward(prompts: list[str], completions: list[str], **fields) -> list[float | None]: ...

``prompts[i]`` is the question completion ``i`` answers, ``fields`` holds, for each field of the prompt lines
(``answer``, ``solution``, ``image``, your own ...), one value per completion (None where a line lacks it), and
``completion_ids`` the completions' token ids. None means "this reward does not apply here" (a completion no reward
applies to gets no advantage). ``--reward_funcs accuracy,format,my_rewards.py:my_reward`` names several, summed with
``--reward_weights`` (1 each by default).

Built-ins (the reference answer is the line's ``answer``, else its ``solution``; None without one):

| name       | 1.0 when                                                                                       |
|------------|------------------------------------------------------------------------------------------------|
| `accuracy` | the final answer equals the reference's: the last ``\\boxed{}``, else what follows the last "Answer:", else the last number (when the reference is a number), else the whole text; numbers compare as numbers (1e-6 relative), text case- and space-insensitively |
| `choice`   | the chosen option letter equals the reference's (``(B)``, ``B.``, ``Answer: B``, ``\\boxed{B}``, a lone letter) |
| `format`   | the completion is one ``<think>...</think>`` followed by a non-empty answer                      |
| `iou`      | a number in [0, 1]: per reference box, the best intersection-over-union of a predicted box, averaged; boxes in InternVL's ``<box>[[x1, y1, x2, y2]]</box>`` (0-1000 coordinates; the reference may also be ``[x1, y1, x2, y2]`` or a list of them) |

A function that raises, or returns the wrong number of values, stops training with an error that names it and the
first sample (``file:line``) it fails on.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from internvl_tune.errors import UserError

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
NUMBER_RE = re.compile(rf"(?<![\w.]){_NUMBER}(?:\s*/\s*\d+)?%?")
ANSWER_RE = re.compile(r"(?:final\s+answer|answer)\s*(?:is)?\s*[:：]?\s*", re.IGNORECASE)
THINK_RE = re.compile(r"^\s*<think>(?:(?!<think>).)*?</think>\s*\S", re.DOTALL)
BOX_RE = re.compile(r"<box>\s*(\[.*?\])\s*</box>", re.DOTALL)
COORDS_RE = re.compile(r"\[\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*\]")
LETTER_PATTERNS = (
    re.compile(r"\\boxed\{\s*\(?([A-Z])\)?\s*\}"),
    re.compile(r"(?:answer|option|choice)\s*(?:is)?\s*[:：]?\s*\(?([A-Z])\)?(?![a-zA-Z])", re.IGNORECASE),
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"(?<![A-Za-z])([A-Z])[.)](?:\s|$)"),
    re.compile(r"^\s*([A-Z])\s*$"),
)


# ----------------------------------------------------------------------------------------- answer extraction
def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def strip_thinking(text: str) -> str:
    """The text after the last ``</think>`` (the whole text without one)."""
    return text.rsplit("</think>", 1)[-1]


def final_answer(text: str) -> str:
    """The final answer of a completion or reference: the last ``\\boxed{}``, else what follows the last "Answer:" (its
    first line), else the whole text (after any ``<think>`` part)."""
    text = strip_thinking(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = list(ANSWER_RE.finditer(text))
    if matches:
        rest = text[matches[-1].end():].strip()
        return rest.splitlines()[0].strip() if rest else ""
    return text.strip()


def parse_number(text: str) -> float | None:
    """``text`` as a number when it is one (``3``, ``-2.5``, ``1,234``, ``3/4``, ``50%``, ``$12``), else None."""
    text = text.strip().strip("$").strip().rstrip(".").strip()
    text = text.replace("\\%", "%").replace("\\frac", "")
    match = re.fullmatch(rf"({_NUMBER})\s*(?:/\s*(\d+))?\s*(%?)", text)
    if not match:
        braces = re.fullmatch(r"\{(\d+)\}\{(\d+)\}", text)  # \frac{3}{4} with \frac removed
        return int(braces.group(1)) / int(braces.group(2)) if braces and int(braces.group(2)) else None
    value = float(match.group(1).replace(",", ""))
    if match.group(2):
        value = value / int(match.group(2)) if int(match.group(2)) else math.nan
    return value / 100 if match.group(3) else value


def last_number(text: str) -> float | None:
    """The last number in ``text``, or None."""
    for match in reversed(list(NUMBER_RE.finditer(text))):
        value = parse_number(match.group(0))
        if value is not None:
            return value
    return None


def _normalise(text: str) -> str:
    text = text.strip().strip("$").strip().rstrip(".").strip()
    text = re.sub(r"\\text\{(.*?)\}", r"\1", text)
    return re.sub(r"\s+", " ", text).lower()


def same_answer(completion: str, reference: str) -> bool:
    """The rule of the ``accuracy`` reward (see the module docstring)."""
    expected = final_answer(reference)
    number = parse_number(expected)
    said = final_answer(completion)
    if number is not None:
        value = parse_number(said)
        has_marker = last_boxed(strip_thinking(completion)) is not None or ANSWER_RE.search(strip_thinking(completion))
        if value is None and not has_marker:
            value = last_number(strip_thinking(completion))
        return value is not None and math.isclose(value, number, rel_tol=1e-6, abs_tol=1e-9)
    return _normalise(said) == _normalise(expected)


def option_letter(text: str) -> str | None:
    """The option letter a text picks (``(B)``, ``B.``, ``Answer: B``, ``\\boxed{B}``, a lone letter), or None."""
    text = strip_thinking(text).strip()
    for pattern in LETTER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


def boxes(value) -> list[tuple[float, float, float, float]]:
    """Boxes of a completion or reference: ``<box>[[x1, y1, x2, y2], ...]</box>`` in text, or ``[x1, y1, x2, y2]`` /
    a list of them."""
    if isinstance(value, (list, tuple)):
        if len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
            return [tuple(float(v) for v in value)]
        return [b for item in value for b in boxes(item)]
    if not isinstance(value, str):
        return []
    found = []
    for group in BOX_RE.findall(value):
        found += [tuple(float(c) for c in m) for m in COORDS_RE.findall(group)]
    return found


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (corners in any order)."""
    ax1, ax2 = sorted((a[0], a[2]))
    ay1, ay2 = sorted((a[1], a[3]))
    bx1, bx2 = sorted((b[0], b[2]))
    by1, by2 = sorted((b[1], b[3]))
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


# ------------------------------------------------------------------------------------------------ built-ins
def _references(fields: dict, n: int) -> list:
    answers, solutions = fields.get("answer") or [None] * n, fields.get("solution") or [None] * n
    return [a if a is not None else s for a, s in zip(answers, solutions)]


def accuracy(prompts: list[str], completions: list[str], **fields) -> list[float | None]:
    """1.0 when the final answer matches the reference (see the module docstring), 0.0 otherwise."""
    refs = _references(fields, len(completions))
    return [None if r is None else float(same_answer(c, str(r))) for c, r in zip(completions, refs)]


def choice(prompts: list[str], completions: list[str], **fields) -> list[float | None]:
    """1.0 when the completion picks the reference's option letter."""
    out = []
    for completion, reference in zip(completions, _references(fields, len(completions))):
        expected = option_letter(str(reference)) if reference is not None else None
        out.append(None if expected is None else float(option_letter(completion) == expected))
    return out


def think_format(prompts: list[str], completions: list[str], **fields) -> list[float | None]:
    """1.0 for ``<think>reasoning</think>`` followed by an answer (one thinking block), 0.0 otherwise."""
    return [float(bool(THINK_RE.match(c)) and c.count("<think>") == 1 and c.count("</think>") == 1)
            for c in completions]


def box_iou(prompts: list[str], completions: list[str], **fields) -> list[float | None]:
    """Mean over the reference boxes of the best IoU with a predicted box (0.0 without a predicted box)."""
    out = []
    for completion, reference in zip(completions, _references(fields, len(completions))):
        expected = boxes(reference)
        if not expected:
            out.append(None)
            continue
        predicted = boxes(completion)
        out.append(sum(max((iou(p, e) for p in predicted), default=0.0) for e in expected) / len(expected))
    return out


BUILTINS: dict[str, Callable] = {"accuracy": accuracy, "choice": choice, "format": think_format, "iou": box_iou}


# -------------------------------------------------------------------------------------------- user functions
def load_reward(spec: str) -> Callable:
    """A built-in name, ``package.module:function`` (importable) or ``path/to/file.py:function``."""
    spec = spec.strip()
    if spec in BUILTINS:
        return BUILTINS[spec]
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise UserError(f"--reward_funcs {spec!r}: not a built-in ({', '.join(BUILTINS)}) nor module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"--reward_funcs {spec!r}: {path} not found")
            unit = importlib.util.spec_from_file_location(f"internvl_tune_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(unit)
            sys.modules[unit.name] = module
            unit.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as exc:  # the user's module failed to import: say which and why
        raise UserError(f"--reward_funcs {spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc} "
                        f"(a file is given as path/to/file.py:function, a module must be importable from the "
                        f"current directory or PYTHONPATH)") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward_funcs {spec!r}: {module_name} has no function {name!r}")
    return fn


@dataclass
class RewardSet:
    """The run's reward functions, their names (for the logs) and weights."""

    names: list[str]
    funcs: list[Callable]
    weights: torch.Tensor

    @classmethod
    def from_flags(cls, reward_funcs: str, reward_weights: str | None) -> RewardSet:
        specs = [s.strip() for s in reward_funcs.split(",") if s.strip()]
        if not specs:
            raise UserError("--reward_funcs is empty: name at least one reward (e.g. accuracy,format)")
        names = [s.rpartition(":")[2] if s not in BUILTINS else s for s in specs]
        if len(set(names)) != len(names):
            raise UserError(f"--reward_funcs {reward_funcs}: two rewards have the same name")
        weights = [1.0] * len(specs)
        if reward_weights:
            try:
                weights = [float(w) for w in reward_weights.split(",")]
            except ValueError:
                raise UserError(f"--reward_weights {reward_weights}: comma-separated numbers, one per reward") from None
            if len(weights) != len(specs):
                raise UserError(f"--reward_weights has {len(weights)} values for {len(specs)} --reward_funcs")
        return cls(names, [load_reward(s) for s in specs], torch.tensor(weights, dtype=torch.float32))

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                 lines: list[dict], where: list[str]) -> torch.Tensor:
        """[completions, functions] float32 rewards, NaN where a function returned None.

        Args:
            prompts, completions, completion_ids: one per completion.
            lines: each completion's prompt-line fields (``data.prompts.reward_fields``).
            where: each completion's ``file:line``, for errors.
        """
        keys = sorted({k for line in lines for k in line})
        fields = {k: [line.get(k) for line in lines] for k in keys}
        out = torch.full((len(completions), len(self.funcs)), math.nan)
        for j, (name, fn) in enumerate(zip(self.names, self.funcs)):
            values = self._call(name, fn, prompts, completions, completion_ids, fields, where)
            for i, v in enumerate(values):
                if v is not None:
                    out[i, j] = float(v)
        return out

    @staticmethod
    def _call(name, fn, prompts, completions, completion_ids, fields, where) -> list:
        try:
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **fields)
        except Exception:
            # find the first sample it fails on, to name it
            for i in range(len(completions)):
                try:
                    fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                       completion_ids=completion_ids[i:i + 1], **{k: v[i:i + 1] for k, v in fields.items()})
                except Exception as one:
                    exc = one
                    raise UserError(f"reward {name} raised {type(exc).__name__}: {exc} on the completion of "
                                    f"{where[i]}: {completions[i][:200]!r}") from exc
            raise UserError(f"reward {name} raised {type(exc).__name__}: {exc} on the batch of {where[0]} ... "
                            f"{where[-1]} (but on no single sample of it)") from exc
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise UserError(f"reward {name} returned {len(values)} values for {len(completions)} completions "
                            f"(samples {where[0]} ...): return one float (or None) per completion")
        for i, v in enumerate(values):
            if v is not None and not (isinstance(v, numbers.Real) and math.isfinite(v)):
                raise UserError(f"reward {name} returned {v!r} for the completion of {where[i]}: return a finite "
                                f"float, or None when the reward does not apply")
        return values
