"""The built-in rewards on hand-made completions, user rewards loaded from a file or a module, weights, and the
errors that name the function and the sample."""

import pytest
import torch

from internvl_tune.errors import UserError
from internvl_tune.models.internvl_chat.objectives.rewards import (
    RewardSet,
    accuracy,
    box_iou,
    choice,
    final_answer,
    think_format,
)


def test_final_answer_extraction():
    assert final_answer("so the sum is \\boxed{\\frac{3}{4}} indeed") == "\\frac{3}{4}"
    assert final_answer("nested \\boxed{x^{2}} then \\boxed{7}") == "7"  # the last box
    assert final_answer("Reasoning...\nAnswer: Paris.\nMore text") == "Paris."
    assert final_answer("<think>the answer is 3</think> The answer is 4") == "4"  # after the thinking part
    assert final_answer("  just this ") == "just this"


@pytest.mark.parametrize("completion,reference,expected", [
    ("12 + 30 = \\boxed{42}.", "42", 1.0),
    ("The answer is 42.0", "42", 1.0),  # numbers compare as numbers
    ("I count 3 apples, no wait: 4 apples", "4", 1.0),  # no marker: the last number
    ("Answer: 41", "42", 0.0),
    ("Answer: 1,234", "1234", 1.0),
    ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
    ("Answer: 50%", "0.5", 1.0),
    ("Answer: Orange.", "orange", 1.0),  # text: case, final period and spaces ignored
    ("Answer: red", "orange", 0.0),
    ("<think>maybe 7</think>\\boxed{8}", "Work: 4 + 4 \\boxed{8}", 1.0),  # a full solution: its box is the answer
    ("no number here", "5", 0.0),
])
def test_accuracy(completion, reference, expected):
    assert accuracy(["q"], [completion], answer=[reference]) == [expected]


def test_accuracy_uses_solution_and_skips_lines_without_reference():
    assert accuracy(["q"] * 3, ["\\boxed{2}"] * 3, answer=[None, "2", None], solution=["2", None, None]) == \
        [1.0, 1.0, None]


@pytest.mark.parametrize("completion,reference,expected", [
    ("The rocket is in the first image, so (A).", "A", 1.0),
    ("Answer: B", "(B) the second", 1.0),
    ("B. the second one", "B", 1.0),
    ("C", "A", 0.0),
    ("\\boxed{D}", "D", 1.0),
    ("A cat is here", "A", 0.0),  # an article is no option letter
])
def test_choice(completion, reference, expected):
    assert choice(["q"], [completion], answer=[reference]) == [expected]
    assert choice(["q"], [completion], answer=["orange"]) == [None]  # no letter in the reference: does not apply


def test_format():
    completions = ["<think>3 + 4 = 7</think> 7", "<think>no answer after</think>", "7 <think>late</think> 7",
                   "<think><think>twice</think> 7", "<think>a</think>\n\\boxed{7}", "plain 7"]
    assert think_format(["q"] * 6, completions) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_iou_of_internvl_boxes():
    # reference [0, 0, 100, 100]; prediction [50, 50, 150, 150]: intersection 50 x 50 = 2500, union 20000 - 2500
    one = box_iou(["q"], ["<ref>cat</ref><box>[[50, 50, 150, 150]]</box>"], answer=["<box>[[0, 0, 100, 100]]</box>"])
    assert one == [pytest.approx(2500 / 17500)]
    # two reference boxes, two predictions in the other order: each reference takes its best match (1 and 0.25)
    two = box_iou(["q"], ["<box>[[0, 0, 40, 40], [100, 100, 200, 200]]</box>"],
                  answer=[[[100, 100, 200, 200], [0, 0, 20, 20]]])
    assert two == [pytest.approx((1.0 + 400 / 1600) / 2)]
    assert box_iou(["q"], ["no box"], answer=[[0, 0, 10, 10]]) == [0.0]
    assert box_iou(["q"], ["<box>[[0, 0, 10, 10]]</box>"], answer=["orange"]) == [None]


def write_module(tmp_path, body: str):
    path = tmp_path / "my_rewards.py"
    path.write_text(body)
    return path


def test_user_rewards_from_a_file_with_weights(tmp_path):
    path = write_module(tmp_path, "def length(prompts, completions, colour=None, **fields):\n"
                                  "    return [len(c) if k else None for c, k in zip(completions, colour)]\n")
    rewards = RewardSet.from_flags(f"accuracy,{path}:length", "2,0.5")
    assert rewards.names == ["accuracy", "length"] and rewards.weights.tolist() == [2.0, 0.5]
    lines = [{"answer": "ab", "colour": "red"}, {"answer": "x", "colour": None}]
    out = rewards(["q1", "q2"], ["ab", "cd"], [[1, 2], [3, 4]], lines, ["a.jsonl:1", "a.jsonl:2"])
    assert torch.equal(torch.isnan(out), torch.tensor([[False, False], [False, True]]))
    assert out[0].tolist() == [1.0, 2.0] and out[1, 0] == 0.0


def test_user_rewards_from_an_importable_module(tmp_path, monkeypatch):
    write_module(tmp_path, "def one(prompts, completions, **fields):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = RewardSet.from_flags("my_rewards:one", None)
    assert rewards(["q"], ["c"], [[1]], [{}], ["f:1"]).tolist() == [[1.0]]


def test_a_reward_that_raises_names_itself_and_the_sample(tmp_path):
    path = write_module(tmp_path, "def picky(prompts, completions, **fields):\n"
                                  "    return [1.0 / (len(c) - 3) for c in completions]\n")
    rewards = RewardSet.from_flags(f"{path}:picky", None)
    with pytest.raises(UserError, match=r"reward picky raised ZeroDivisionError: .* on the completion of "
                                        r"p\.jsonl:7: 'abc'"):
        rewards(["q"] * 3, ["abcd", "abc", "ab"], [[1]] * 3, [{}] * 3, ["p.jsonl:5", "p.jsonl:7", "p.jsonl:9"])


def test_bad_reward_specs_and_results_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="'acuracy': not a built-in"):
        RewardSet.from_flags("acuracy", None)
    with pytest.raises(UserError, match="missing.py not found"):
        RewardSet.from_flags(f"{tmp_path}/missing.py:f", None)
    with pytest.raises(UserError, match="importing no_such_module_xyz failed: ModuleNotFoundError"):
        RewardSet.from_flags("no_such_module_xyz:f", None)
    path = write_module(tmp_path, "def short(prompts, completions, **f):\n    return [1.0]\n"
                                  "def text(prompts, completions, **f):\n    return ['good'] * len(completions)\n")
    with pytest.raises(UserError, match="has no function 'nope'"):
        RewardSet.from_flags(f"{path}:nope", None)
    with pytest.raises(UserError, match="--reward_weights has 1 values for 2"):
        RewardSet.from_flags(f"accuracy,{path}:short", "1")
    with pytest.raises(UserError, match="reward short returned 1 values for 2 completions"):
        RewardSet.from_flags(f"{path}:short", None)(["q"] * 2, ["a", "b"], [[1], [2]], [{}] * 2, ["f:1", "f:2"])
    with pytest.raises(UserError, match="reward text returned 'good' for the completion of f:1"):
        RewardSet.from_flags(f"{path}:text", None)(["q"], ["a"], [[1]], [{}], ["f:1"])


@pytest.mark.parametrize("text,value", [("42", 42.0), ("-2.5", -2.5), (".5", 0.5), ("1,234", 1234.0),
                                        ("1,234.5", 1234.5), ("1e3", 1000.0), ("3/4", 0.75), ("50%", 0.5),
                                        ("$12", 12.0), ("\\frac{3}{4}", 0.75), ("e1", None), ("+", None),
                                        ("1.2.3", None), ("cat", None)])
def test_numbers(text, value):
    from internvl_tune.models.internvl_chat.objectives.rewards import parse_number

    assert parse_number(text) == value
