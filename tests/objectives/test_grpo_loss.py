"""GRPO / GSPO loss terms and advantages against values worked out by hand (the arithmetic is in the comments), the
flag defaults and refusals."""

import math

import pytest
import torch

from internvl_tune.errors import UserError
from internvl_tune.models.internvl_chat.objectives.grpo_loss import GRPOArgs, advantages, loss_weight, policy_loss


def args(objective="grpo", **flags) -> GRPOArgs:
    return GRPOArgs(objective=objective, **flags).resolve()


# Two completions: row 0 has tokens 0, 1 (advantage +1), row 1 has token 2 (advantage -2).
# log pi = [-1.0, -2.0, -0.5], log pi_old = [-1.1, -1.9, -0.5]  ->  log ratios [0.1, -0.1, 0.0].
LOGP = torch.tensor([-1.0, -2.0, -0.5])
OLD = torch.tensor([-1.1, -1.9, -0.5])
ROWS = torch.tensor([0, 0, 1])
ADV = torch.tensor([1.0, -2.0])
E = math.exp


def test_token_level_loss_reductions_by_hand():
    # per-token loss -min(w A, clip(w, 0.8, 1.2) A): no ratio leaves [0.8, 1.2] here, so it is -w A:
    #   token 0: -e^0.1 * 1 = -1.105171, token 1: -e^-0.1 * 1 = -0.904837, token 2: -1 * -2 = +2
    t0, t1, t2 = -E(0.1), -E(-0.1), 2.0
    cases = {
        "grpo": (t0 + t1) / 2 + t2 / 1,  # mean per completion, summed over completions (the step divides by 2)
        "dapo": t0 + t1 + t2,  # token sum (the step divides by the global 3 tokens)
        "bnpo": (t0 + t1 + t2) / 3,  # over this micro-batch's tokens
        "dr_grpo": (t0 + t1 + t2) / 256,  # over max_completion_length
    }
    for loss_type, expected in cases.items():
        out = policy_loss(LOGP, ROWS, ADV, args(loss_type=loss_type), OLD)
        assert out["loss"].item() == pytest.approx(expected, rel=1e-6), loss_type
        assert out["clipped_low"].sum() == out["clipped_high"].sum() == 0
    assert [loss_weight(t, completions=2, tokens=3) for t in ("grpo", "dapo", "bnpo", "dr_grpo")] == [2, 3, 1, 2]


def test_clipping_by_hand():
    # ratios e^0.5 = 1.6487 (A = +1: clipped to 1.2) and e^-0.5 = 0.6065 (A = -2: clipped to 0.8, min picks -2 * 0.8)
    logp, old = torch.tensor([0.0, -1.0]), torch.tensor([-0.5, -0.5])
    out = policy_loss(logp, torch.tensor([0, 1]), ADV, args(loss_type="dapo", epsilon=0.2), old)
    # token 0: -min(1.6487 * 1, 1.2 * 1) = -1.2; token 1: -min(0.6065 * -2, 0.8 * -2) = -(-1.6) = 1.6
    assert out["loss"].item() == pytest.approx(-1.2 + 1.6, rel=1e-6)
    assert out["clipped_high"].tolist() == [1.0, 0.0] and out["clipped_low"].tolist() == [0.0, 1.0]
    # epsilon_high widens only the upper side: 1.6487 < 1 + 0.7 is not clipped any more
    wide = policy_loss(logp, torch.tensor([0, 1]), ADV, args(loss_type="dapo", epsilon=0.2, epsilon_high=0.7), old)
    assert wide["loss"].item() == pytest.approx(-E(0.5) + 1.6, abs=1e-6)
    # gradient: a clipped token contributes none (token 0), an unclipped one -A w (d w / d logp = w)
    logp.requires_grad_(True)
    policy_loss(logp, torch.tensor([0, 1]), ADV, args(loss_type="dapo"), old)["loss"].backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0])  # token 1 is clipped too (its min is the clipped term)


def test_sequence_level_ratio_by_hand():
    # gspo: row 0's ratio is e^{mean(0.1, -0.1)} = e^0 = 1 for both its tokens, row 1's e^0 = 1
    out = policy_loss(LOGP, ROWS, ADV, args("gspo"), OLD)  # gspo defaults to the grpo reduction
    assert args("gspo").loss_type == "grpo"
    assert out["loss"].item() == pytest.approx((-1 - 1) / 2 + 2.0, rel=1e-6)
    # with old = [-1.3, -2.1, -0.5] the log ratios are [0.3, 0.1, 0]: row 0's mean 0.2 -> w = e^0.2 = 1.2214 > 1.2,
    # clipped: -min(1.2214, 1.2) = -1.2 on each of its tokens
    out = policy_loss(LOGP, ROWS, ADV, args("gspo"), torch.tensor([-1.3, -2.1, -0.5]))
    assert out["loss"].item() == pytest.approx(-1.2 + 2.0, rel=1e-6)
    assert out["clipped_high"].tolist() == [1.0, 1.0, 0.0]
    # the gradient of a sequence ratio spreads over the row's tokens: d/dlogp_t of -w A = -w A / T (unclipped)
    logp = LOGP.clone().requires_grad_(True)
    policy_loss(logp, ROWS, ADV, args("gspo"), OLD)["loss"].backward()
    # row 0's loss is its per-token mean of -w A = -w A (all its tokens share w), and d w / d logp_t = w / T:
    # -(1 * 1) / 2 = -0.5 for each of its two tokens; row 1: -w A = 2 w, d/d logp = 2 * 1 / 1 = 2
    assert logp.grad.tolist() == pytest.approx([-0.5, -0.5, 2.0])


def test_kl_term_by_hand():
    # ref = [-1.0, -1.5, -1.5]: delta = ref - logp = [0, 0.5, -1]; k3 = e^d - d - 1 = [0, 0.148721, 0.367879]
    ref = torch.tensor([-1.0, -1.5, -1.5])
    out = policy_loss(LOGP, ROWS, ADV, args(loss_type="dapo", beta=0.04), None, ref)
    kl = [0.0, E(0.5) - 1.5, E(-1.0)]
    assert out["kl"].tolist() == pytest.approx(kl, rel=1e-6)
    # without pi_old the ratios are 1: the policy part is -(1 + 1) + 2 = 0, plus 0.04 x the KL sum
    assert out["loss"].item() == pytest.approx(0.04 * sum(kl), rel=1e-5)


def test_advantages_by_hand():
    # one group of 4: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    std = math.sqrt(1 / 3)
    assert advantages(r, 4, "group").tolist() == pytest.approx(
        [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    assert advantages(r, 4, "none").tolist() == [0.5, -0.5, -0.5, 0.5]
    assert advantages(r, 4, "batch", torch.tensor(2.0)).tolist() == pytest.approx(
        [0.5 / 2.0001, -0.5 / 2.0001, -0.5 / 2.0001, 0.5 / 2.0001], rel=1e-6)
    # equal rewards in a group: advantage 0; a completion no reward applied to (NaN) is left out and gets 0
    r = torch.tensor([3.0, 3.0, 1.0, float("nan"), 2.0, 0.0])  # groups of 3: [3, 3, 1], [nan, 2, 0]
    out = advantages(r, 3, "none")
    assert out.tolist() == pytest.approx([2 / 3, 2 / 3, -4 / 3, 0.0, 1.0, -1.0])
    assert advantages(torch.tensor([2.0, 2.0]), 2, "group").tolist() == [0.0, 0.0]


def test_defaults_follow_trl_and_bad_values_are_refused():
    g = args()
    assert (g.num_generations, g.max_completion_length, g.temperature, g.beta, g.epsilon, g.epsilon_high,
            g.loss_type, g.scale_rewards, g.num_iterations, g.reward_funcs) == \
        (8, 256, 1.0, 0.0, 0.2, 0.2, "dapo", "group", 1, "accuracy")
    assert not g.sequence_level and args("gspo").sequence_level
    for flags, message in [({"num_generations": 1}, "--num_generations 1: must be at least 2"),
                           ({"temperature": 0.0}, "--temperature 0.0: must be positive"),
                           ({"loss_type": "sigmoid"}, "--loss_type sigmoid: must be one of grpo, dapo, bnpo"),
                           ({"scale_rewards": "rank"}, "--scale_rewards rank"),
                           ({"cache_implementation": "paged"}, "--cache_implementation paged")]:
        with pytest.raises(UserError, match=message):
            args(**flags)
