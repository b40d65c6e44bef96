"""GRPO / GSPO (``--objective grpo|gspo``): the flags (trl's ``GRPOConfig`` names), the group-normalised advantages
and the clipped policy loss, as trl's ``GRPOTrainer`` computes them.

For completion ``i`` of a prompt with ``G`` completions, reward ``r_i`` (the ``--reward_weights`` sum of the reward
functions; NaN when none applies) and tokens ``t``:

- advantage ``A_i = (r_i - mean(r of its group)) / (std + 1e-4)``, the std (unbiased) over its group
  (``--scale_rewards group``), over the whole global batch (``batch``), or no division (``none``, Dr. GRPO); NaN
  rewards are left out of the statistics and get ``A = 0``;
- ratio ``w_t = exp(log pi(t) - log pi_old(t))`` per token (grpo), or one per completion, ``exp`` of the mean
  over its tokens of that difference (gspo: GSPO's sequence-level ratio, trl's ``importance_sampling_level=
  "sequence"``); ``pi_old`` is the policy that sampled the completions (the same weights when
  ``--num_iterations`` is 1, so ``w = 1`` and only its gradient acts);
- per-token loss ``-min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A) + beta KL_t`` with
  ``KL_t = exp(ref - log pi) - (ref - log pi) - 1`` (the k3 estimator, against the reference model);
- reduced per ``--loss_type``: ``grpo`` the mean over each completion's tokens, then over completions; ``dapo`` the
  mean over all completion tokens of the global batch; ``bnpo`` over the tokens of each micro-batch, then over
  micro-batches; ``dr_grpo`` the token sum over ``completions x max_completion_length``.

Each reduction is a sum over the micro-batch divided by a *weight* (completions, tokens, 1, completions): the step
divides the micro-batches' sums by the global batch's weight (``train/step.py``), so the result never depends on
how the global batch is split over ranks and accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from internvl_tune.errors import UserError
from internvl_tune.options import option

LOSS_TYPES = ("grpo", "dapo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
DEFAULT_LOSS = {"grpo": "dapo", "gspo": "grpo"}  # trl's default; GSPO's paper reduces per sequence
CACHE_IMPLEMENTATIONS = ("dynamic", "static")


@dataclass
class GRPOArgs:
    """Online RL flags (trl's ``GRPOConfig`` names where trl has the setting)."""

    objective: str = option("grpo", "grpo (token-level ratio) or gspo (sequence-level ratio): set by --objective",
                            tuple(DEFAULT_LOSS), flag=False)
    num_generations: int | None = option(None, "completions sampled per prompt, the group their rewards are "
                                               "normalised in (default: 8)")
    max_completion_length: int | None = option(None, "most tokens per completion, the stop token included; "
                                                     "--max_seq_length must hold the prompt and them (default: 256)")
    temperature: float | None = option(None, "sampling temperature of the completions (default: 1.0)")
    top_p: float | None = option(None, "sample from the most likely tokens whose probabilities sum to top_p "
                                       "(default: 1.0, all)")
    top_k: int | None = option(None, "sample from the top_k most likely tokens (default: 0, all)")
    reward_funcs: str | None = option(None, "comma-separated rewards: built-ins accuracy, choice, format, iou, or "
                                            "module:function / path/to/file.py:function (default: accuracy)")
    reward_weights: str | None = option(None, "comma-separated weights of --reward_funcs (default: 1 each)")
    scale_rewards: str | None = option(None, "divide advantages by the std of rewards in their group, the global "
                                             "batch, or not at all (default: group)")
    loss_type: str | None = option(None, "how per-token losses are averaged: grpo (per completion, then over "
                                         "completions), dapo (over the global batch's tokens), bnpo (over each "
                                         "micro-batch's tokens), dr_grpo (token sum / max_completion_length) "
                                         "(default: dapo for grpo, grpo for gspo)")
    beta: float | None = option(None, "weight of the KL term to the reference model (LoRA: the base with adapters "
                                      "off; full: a frozen copy); 0 = no reference pass (default: 0.0)")
    epsilon: float | None = option(None, "clipping range of the ratio, below 1 (default: 0.2)")
    epsilon_high: float | None = option(None, "clipping range above 1 (DAPO: 0.28) (default: --epsilon)")
    num_iterations: int | None = option(None, "optimizer steps on each batch of completions (trl's mu) "
                                              "(default: 1)")
    cache_implementation: str | None = option(None, "generation's KV cache: dynamic, or static (fixed shapes: its "
                                                    "decode step is compiled once, with CUDA graphs, on one GPU) "
                                                    "(default: static on one GPU, dynamic otherwise)")

    def resolve(self) -> GRPOArgs:
        """A copy with the defaults filled in; values that cannot work are refused."""
        out = replace(
            self, loss_type=_or(self.loss_type, DEFAULT_LOSS[self.objective]),
            num_generations=_or(self.num_generations, 8), max_completion_length=_or(self.max_completion_length, 256),
            temperature=_or(self.temperature, 1.0), top_p=_or(self.top_p, 1.0), top_k=_or(self.top_k, 0),
            reward_funcs=_or(self.reward_funcs, "accuracy"), scale_rewards=_or(self.scale_rewards, "group"),
            beta=_or(self.beta, 0.0), epsilon=_or(self.epsilon, 0.2), num_iterations=_or(self.num_iterations, 1))
        out.epsilon_high = _or(self.epsilon_high, out.epsilon)
        checks = [
            (out.num_generations >= 2, "--num_generations", "at least 2: advantages compare completions of a prompt"),
            (out.max_completion_length >= 1, "--max_completion_length", "at least 1"),
            (out.temperature > 0, "--temperature", "positive: greedy completions of a prompt would all be equal"),
            (0 < out.top_p <= 1, "--top_p", "in (0, 1]"),
            (out.top_k >= 0, "--top_k", "0 (all tokens) or more"),
            (out.beta >= 0, "--beta", "0 or more"),
            (out.epsilon >= 0 and out.epsilon_high >= 0, "--epsilon", "0 or more (and --epsilon_high)"),
            (out.num_iterations >= 1, "--num_iterations", "at least 1"),
            (out.loss_type in LOSS_TYPES, "--loss_type", f"one of {', '.join(LOSS_TYPES)} for {out.objective}"),
            (out.scale_rewards in SCALE_REWARDS, "--scale_rewards", f"one of {', '.join(SCALE_REWARDS)}"),
            (out.cache_implementation in (None, *CACHE_IMPLEMENTATIONS), "--cache_implementation",
             f"one of {', '.join(CACHE_IMPLEMENTATIONS)}"),
        ]
        for ok, flag, rule in checks:
            if not ok:
                raise UserError(f"{flag} {getattr(out, flag[2:])}: must be {rule}")
        return out


    @property
    def sequence_level(self) -> bool:
        """GSPO: one importance ratio per completion."""
        return self.objective == "gspo"

    def describe(self) -> str:
        """The plan line: ``grpo: 8 completions per prompt ..., loss dapo, epsilon 0.2/0.2, beta 0``."""
        ratio = "sequence-level ratio" if self.sequence_level else "token-level ratio"
        return (f"{self.objective}: {self.num_generations} completions per prompt (up to {self.max_completion_length} "
                f"tokens, temperature {self.temperature:g}, top_p {self.top_p:g}, top_k {self.top_k}), rewards "
                f"{self.reward_funcs}, advantages scaled per {self.scale_rewards}, {ratio}, loss {self.loss_type}, "
                f"epsilon {self.epsilon:g}/{self.epsilon_high:g}, beta {self.beta:g}, {self.num_iterations} "
                f"update(s) per batch of completions")


def _or(value, default):
    return default if value is None else value


# ------------------------------------------------------------------------------------------------- advantages
def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaN (NaN with fewer than two values), as trl's ``nanstd``."""
    keep = ~torch.isnan(x)
    count = keep.sum(dim=dim) if dim is not None else keep.sum()
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    squares = torch.where(keep, (x - mean) ** 2, torch.zeros_like(x))
    total = squares.sum(dim=dim) if dim is not None else squares.sum()
    return torch.where(count > 1, (total / (count - 1).clamp_min(1)).sqrt(), torch.full_like(total, float("nan")))


def advantages(rewards: torch.Tensor, group: int, scale: str, batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """Group-normalised advantages of the rewards [completions] (groups of ``group`` consecutive completions).

    Args:
        rewards: weighted rewards, NaN for completions no reward applies to.
        group: completions per prompt.
        scale: ``group``, ``batch`` or ``none`` (see the module docstring).
        batch_std: the std of the whole global batch's rewards (``batch`` scaling; it spans ranks).
    """
    grouped = rewards.view(-1, group)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (_nanstd(grouped, dim=1)[:, None] + 1e-4)
    elif scale == "batch":
        centred = centred / (batch_std + 1e-4)
    return torch.nan_to_num(centred.reshape(-1), nan=0.0)


# ----------------------------------------------------------------------------------------------------- the loss
def loss_weight(loss_type: str, completions: int, tokens: int) -> float:
    """A micro-batch's share of its loss normaliser (see the module docstring)."""
    return {"grpo": completions, "dapo": tokens, "bnpo": 1, "dr_grpo": completions}[loss_type]


def policy_loss(log_probs: torch.Tensor, rows: torch.Tensor, row_advantages: torch.Tensor, args: GRPOArgs,
                old_log_probs: torch.Tensor | None = None, ref_log_probs: torch.Tensor | None = None) -> dict:
    """The micro-batch's loss sum (to be divided by the global weight) and its per-token and per-completion parts.

    Args:
        log_probs: [N] log pi of each completion token (with gradient).
        rows: [N] the completion (row of the micro-batch, 0..R-1) of each token.
        row_advantages: [R] advantage of each completion.
        args: resolved flags.
        old_log_probs: [N] log pi_old, or None when the sampling policy is the current one.
        ref_log_probs: [N] the reference's log-probs (needed when ``beta > 0``).

    Returns:
        ``loss`` (0-d), and for the logs: ``kl`` [N] (zeros without beta), ``clipped_low`` / ``clipped_high`` [N]
        (1.0 where the ratio was clipped; per token, or the completion's value on each of its tokens for gspo).
    """
    completions = row_advantages.shape[0]
    counts = torch.bincount(rows, minlength=completions).clamp_min(1).to(log_probs.dtype)
    old = log_probs.detach() if old_log_probs is None else old_log_probs
    log_ratio = log_probs - old
    if args.sequence_level:
        per_row = torch.zeros(completions, dtype=log_ratio.dtype, device=log_ratio.device).index_add(0, rows, log_ratio)
        log_ratio = (per_row / counts)[rows]
    ratio = log_ratio.exp()
    advantage = row_advantages[rows].to(ratio.dtype)
    clipped = ratio.clamp(1 - args.epsilon, 1 + args.epsilon_high)
    per_token = -torch.minimum(ratio * advantage, clipped * advantage)
    kl = torch.zeros_like(per_token)
    if args.beta:
        delta = ref_log_probs - log_probs
        kl = delta.exp() - delta - 1
        per_token = per_token + args.beta * kl
    if args.loss_type == "grpo":
        loss = (per_token / counts[rows]).sum()
    elif args.loss_type == "dapo":
        loss = per_token.sum()
    elif args.loss_type == "bnpo":
        loss = per_token.sum() / max(per_token.shape[0], 1)
    else:  # dr_grpo
        loss = per_token.sum() / args.max_completion_length
    if per_token.shape[0] == 0:
        loss = loss + 0.0 * log_probs.sum()
    low = ((ratio < 1 - args.epsilon) & (advantage < 0)).float()
    high = ((ratio > 1 + args.epsilon_high) & (advantage > 0)).float()
    return {"loss": loss, "kl": kl.detach(), "clipped_low": low, "clipped_high": high}
