"""The preference objectives of the reference's ``internvl_chat_mpo.py`` (trl 0.10.1's ``DPOTrainer``, as InternVL's
``MultimodalDPOTrainer`` combines its losses), as per-pair terms.

With ``c = log pi(chosen) - log pi_ref(chosen)`` and ``r`` the same for the rejected answer (sums over the answer's
tokens), per pair:

- ``sigmoid`` (DPO, the preference loss): ``-log sigmoid(beta (c - r))``;
- ``bco_pair`` (the quality loss): ``-log sigmoid(beta c - delta) - log sigmoid(-(beta r - delta))``, where ``delta``
  is the running mean of the micro-batches' mean reward (``beta c`` and ``beta r`` of all their pairs), updated
  before use, over every micro-step and rank so far (trl's ``RunningMoments``);
- ``nll`` (the generation loss, ``--rpo_alpha``): the mean cross-entropy of the chosen answer's tokens.

The loss is ``sigmoid_loss_weight x sigmoid + bco_pair_loss_weight x bco_pair + rpo_alpha x nll``. The module
returns sums over the micro-batch's pairs; the step divides them by the pairs of the whole global batch, so every
logged term is a mean per pair.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from internvl_tune.errors import UserError
from internvl_tune.options import option

LOSS_TYPES = ("sigmoid", "bco_pair")
# objective -> defaults of (loss_type, sigmoid_loss_weight, bco_pair_loss_weight, rpo_alpha); mpo: the MPO scripts
DEFAULTS = {"dpo": ("sigmoid", 1.0, 1.0, 0.0), "mpo": ("sigmoid,bco_pair", 0.8, 0.2, 1.0)}
BETA = 0.1  # trl's DPOConfig default, which the reference keeps


@dataclass
class PreferenceArgs:
    """Preference-tuning flags (the reference's names: trl's ``DPOConfig`` and ``internvl_chat_mpo.py``)."""

    objective: str = option("dpo", "dpo or mpo: which defaults apply (set by --objective)", tuple(DEFAULTS),
                            flag=False)
    loss_type: str | None = option(None, "comma-separated preference losses: sigmoid (DPO), bco_pair (BCO) (default: "
                                         "sigmoid for dpo, sigmoid,bco_pair for mpo)")
    beta: float | None = option(None, f"KL coefficient of the preference losses (default: {BETA})")
    sigmoid_loss_weight: float | None = option(None, "weight of the sigmoid loss (default: 1 for dpo, 0.8 for mpo)")
    bco_pair_loss_weight: float | None = option(None, "weight of the bco_pair loss (default: 1 for dpo, 0.2 for mpo)")
    rpo_alpha: float | None = option(None, "weight of the generation loss, the chosen answer's mean token "
                                           "cross-entropy; 0 = off (default: 0 for dpo, 1 for mpo)")

    def resolve(self) -> PreferenceArgs:
        """A copy with the objective's defaults filled in; flags that cannot work are refused."""
        loss_type, sigmoid, bco, alpha = DEFAULTS[self.objective]
        out = replace(self, loss_type=self.loss_type if self.loss_type is not None else loss_type,
                      beta=self.beta if self.beta is not None else BETA,
                      sigmoid_loss_weight=self.sigmoid_loss_weight if self.sigmoid_loss_weight is not None else sigmoid,
                      bco_pair_loss_weight=self.bco_pair_loss_weight if self.bco_pair_loss_weight is not None else bco,
                      rpo_alpha=self.rpo_alpha if self.rpo_alpha is not None else alpha)
        unknown = [t for t in out.losses if t not in LOSS_TYPES]
        if unknown or not out.losses:
            raise UserError(f"--loss_type {out.loss_type}: use sigmoid, bco_pair or sigmoid,bco_pair (trl's other loss "
                            f"types are not implemented)")
        if out.beta <= 0:
            raise UserError(f"--beta {out.beta}: must be positive (the reference uses 0.1)")
        negative = [n for n in ("sigmoid_loss_weight", "bco_pair_loss_weight", "rpo_alpha") if getattr(out, n) < 0]
        if negative:
            raise UserError(f"--{negative[0]} {getattr(out, negative[0])}: loss weights must not be negative")
        return out

    @property
    def losses(self) -> tuple[str, ...]:
        """The preference losses of ``loss_type``, in order."""
        return tuple(t.strip() for t in (self.loss_type or "").split(",") if t.strip())

    def describe(self) -> str:
        """``mpo: 0.8 x sigmoid + 0.2 x bco_pair + 1 x nll (rpo_alpha), beta 0.1``."""
        terms = [f"{getattr(self, f'{t}_loss_weight'):g} x {t}" for t in self.losses]
        if self.rpo_alpha:
            terms.append(f"{self.rpo_alpha:g} x nll (rpo_alpha)")
        return f"{self.objective}: {' + '.join(terms)}, beta {self.beta:g}"


class RewardShift:
    """``delta`` of the bco_pair loss: the running mean of the micro-batches' mean reward, over ranks and steps.

    Each rank adds its micro-batch's mean once per micro-step (one all-reduce of two numbers, no host sync), as trl's
    ``RunningMoments.update`` gathers one value per process. The state is two numbers, saved in checkpoints.

    Args:
        all_reduce_sum: sums a tensor over ranks (identity on one process).
    """

    def __init__(self, all_reduce_sum):
        self.all_reduce_sum = all_reduce_sum
        self.mean: torch.Tensor | None = None  # float64, on the device
        self.count: torch.Tensor | None = None

    def update(self, batch_mean: torch.Tensor) -> torch.Tensor:
        """Add this rank's micro-batch mean reward; returns the new running mean."""
        total = self.all_reduce_sum(torch.stack([batch_mean.detach().double(), batch_mean.new_ones((), dtype=torch.float64)]))
        if self.mean is None:
            self.mean, self.count = torch.zeros_like(total[0]), torch.zeros_like(total[1])
        count = self.count + total[1]
        self.mean = self.mean + (total[0] / total[1] - self.mean) * (total[1] / count)
        self.count = count
        return self.mean

    def current(self, like: torch.Tensor) -> torch.Tensor:
        return self.mean if self.mean is not None else like.new_zeros((), dtype=torch.float64)

    def state(self) -> dict:
        return {} if self.mean is None else {"bco_reward_mean": self.mean.item(), "bco_reward_count": self.count.item()}

    def load_state(self, state: dict, device) -> None:
        if "bco_reward_mean" in state:
            self.mean = torch.tensor(state["bco_reward_mean"], dtype=torch.float64, device=device)
            self.count = torch.tensor(state["bco_reward_count"], dtype=torch.float64, device=device)


def preference_losses(policy: torch.Tensor, reference: torch.Tensor, chosen_tokens: torch.Tensor,
                      args: PreferenceArgs, shift: RewardShift | None = None, update: bool = True) -> dict:
    """The loss and the logged terms, each summed over the micro-batch's pairs (0-d tensors, ``loss`` first).

    Args:
        policy, reference: [2 x pairs] log-probability sums of the rows chosen 0, rejected 0, chosen 1, ...
        chosen_tokens: [pairs] supervised tokens of each chosen answer (the generation loss is their mean).
        args: resolved flags.
        shift: the bco_pair reward shift (needed when ``bco_pair`` is a loss).
        update: add this micro-batch to the shift first (training), or use it as it is (validation).
    """
    beta = args.beta
    chosen, rejected = policy[0::2] - reference[0::2], policy[1::2] - reference[1::2]
    chosen_reward, rejected_reward = beta * chosen.detach(), beta * rejected.detach()
    terms, loss = {}, torch.zeros_like(chosen)
    for name in args.losses:
        if name == "sigmoid":
            term = -F.logsigmoid(beta * (chosen - rejected))
        else:
            mean = torch.cat([chosen_reward, rejected_reward]).mean()
            delta = (shift.update(mean) if update else shift.current(mean)).to(chosen.dtype)
            term = -F.logsigmoid(beta * chosen - delta) - F.logsigmoid(-(beta * rejected - delta))
        terms[f"{name}_loss"] = term
        loss = loss + getattr(args, f"{name}_loss_weight") * term
    if args.rpo_alpha:
        terms["nll_loss"] = -policy[0::2] / chosen_tokens.to(policy.dtype)
        loss = loss + args.rpo_alpha * terms["nll_loss"]
    return {
        "loss": loss.sum(), **{k: v.detach().sum() for k, v in terms.items()},
        "rewards/chosen": chosen_reward.sum(), "rewards/rejected": rejected_reward.sum(),
        "rewards/accuracies": (chosen_reward > rejected_reward).float().sum(),
        "rewards/margins": (chosen_reward - rejected_reward).sum(),
        "logps/chosen": policy[0::2].detach().sum(), "logps/rejected": policy[1::2].detach().sum(),
    }
