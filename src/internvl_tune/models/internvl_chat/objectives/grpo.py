"""Online RL (``--objective grpo|gspo``) of InternVL2 chat models: the rollout, the training module and the recipe.

Each optimizer step (``prepare_step``, called by the trainer before the step):

1. **Rollout** (every ``--num_iterations`` steps): every rank samples ``--num_generations`` completions for each of
   its prompts with the current policy (``generation.py``: eval mode, parameters gathered once, the random stream
   of completion ``g`` of dataset sample ``i`` at step ``s`` keyed by ``(seed, s, i, g)``); rewards
   (``rewards.py``) are computed on the host, advantages per group on the rank that holds the group (a prompt's
   completions never leave its rank), statistics over ranks with one gather of a few numbers. With ``--beta`` the
   reference's log-probabilities of the completions are computed here too, once.
2. **Training batches**: each prompt and its completions become rows (padded, or packed into one row with
   per-completion attention under ``--use_packed_ds``) that share the prompt's image features; the supervised
   positions are the completion tokens.
3. **Update**: the training module's forward gives the policy's log-probabilities and the clipped loss
   (``grpo_loss.py``). With ``--num_iterations`` > 1 the same completions train several steps; the first step's
   log-probabilities (before any update) are kept as ``pi_old`` for the others.

Exact resume: completions depend only on the weights and their stream keys, so a resumed run samples what the
killed one sampled; a checkpoint inside a ``--num_iterations`` block keeps that block's completions and numbers in
its run state.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import torch

from internvl_tune.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_tune.data.batching import ChatBatch, ChatCollator, GlobalBatchSampler
from internvl_tune.data.config import DataConfig
from internvl_tune.data.prompts import PromptBatch, PromptCollator, PromptDataset
from internvl_tune.data.templates import get_template
from internvl_tune.errors import UserError
from internvl_tune.models.common.recipe import PreparedStep, StepContext
from internvl_tune.models.internvl_chat.generation import Generator, Sampling, stream_key
from internvl_tune.models.internvl_chat.loss import token_log_probs
from internvl_tune.models.internvl_chat.objectives.grpo_loss import GRPOArgs, advantages, loss_weight, policy_loss
from internvl_tune.models.internvl_chat.objectives.reference import ReferenceRecipe, ReferenceTrainModule
from internvl_tune.models.internvl_chat.objectives.rewards import RewardSet
from internvl_tune.models.internvl_chat.recipe import ChatTrainModule, ModelArgs

COMPLETIONS_LOG = "completions.jsonl"


@dataclass
class GRPOBatch(ChatBatch):
    """The training rows of one micro-batch of prompts: each prompt followed by one of its completions (``loss_sample``
    is the row). Per row its ``advantages`` [rows]; per supervised token (the completion tokens, in ``loss_index``
    order) ``old_log_probs`` (None: the current policy's) and ``ref_log_probs`` (None without ``--beta``).
    ``token_scale`` / ``row_scale`` turn a sum over tokens / completions into its share of the global mean once the
    step divides by the global weight."""

    rows: int = 0
    advantages: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    token_scale: float = 0.0
    row_scale: float = 0.0


class GRPOTrainModule(ReferenceTrainModule):
    """``forward(batch: GRPOBatch)`` -> the policy loss and its logged terms (see ``grpo_loss.py``)."""

    def __init__(self, chat, args: GRPOArgs, reference=None):
        super().__init__(chat, reference)
        self.args = args
        self.captured: list[torch.Tensor] = []  # log-probs of the first update of a block: pi_old of the next ones

    @staticmethod
    def _token_log_probs(module: ChatTrainModule, batch: GRPOBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return token_log_probs(module.hidden_states(batch), module.model.lm_head.weight, batch.loss_index,
                               batch.loss_target)

    def forward(self, batch: GRPOBatch) -> dict[str, torch.Tensor]:
        log_probs, entropy = self._token_log_probs(self, batch)
        if batch.old_log_probs is None and self.args.num_iterations > 1 and self.training:
            self.captured.append(log_probs.detach())
        rows = batch.loss_sample
        out = policy_loss(log_probs, rows, batch.advantages, self.args, batch.old_log_probs, batch.ref_log_probs)
        if self.args.sequence_level:  # a completion counts once in the clip ratios
            per_token = 1.0 / torch.bincount(rows, minlength=batch.rows).clamp_min(1).float()[rows]
            share = per_token * batch.row_scale
        else:
            share = torch.full_like(log_probs.detach(), batch.token_scale)
        low, high = out["clipped_low"], out["clipped_high"]
        terms = {"loss": out["loss"], "entropy": (entropy * batch.token_scale).sum()}
        if self.args.beta:
            terms["kl"] = (out["kl"] * batch.token_scale).sum()
        terms.update({"clip_ratio/low_mean": (low * share).sum(), "clip_ratio/high_mean": (high * share).sum(),
                      "clip_ratio/region_mean": (torch.maximum(low, high) * share).sum()})
        return terms

    @torch.no_grad()
    def reference_log_probs(self, batch: GRPOBatch) -> torch.Tensor:
        """The reference model's log-probabilities of the batch's completion tokens."""
        with self.reference_model() as reference:
            return self._token_log_probs(reference, batch)[0]


class RepeatedSteps:
    """A batch sampler whose every optimizer step comes ``times`` times in a row (``--num_iterations``: several
    updates on one batch of completions); an epoch has ``times`` x the steps."""

    def __init__(self, sampler, times: int):
        self.sampler, self.times = sampler, times
        self.global_batch = sampler.global_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch * self.times

    def epoch_steps(self, epoch: int, start_step: int = 0):
        for step, micro in self.sampler.epoch_steps(epoch, start_step // self.times):
            for k in range(self.times):
                if step * self.times + k >= start_step:
                    yield step * self.times + k, micro


@dataclass
class MicroRollout:
    """The completions of one micro-batch of prompts and their numbers (JSON-able for the run state)."""

    completions: list[list[int]]
    advantages: list[float]
    old_log_probs: list[float] | None = None
    ref_log_probs: list[float] | None = None


@dataclass
class Rollout:
    """One batch of completions (every micro-batch of a step on this rank), sampled at optimizer step ``step``."""

    step: int
    micro: list[MicroRollout]
    logs: dict[str, float]
    scales: tuple[float, float]  # (token_scale, row_scale)
    log_rows: list[dict] = field(default_factory=list)

    def state(self) -> dict:
        return {"step": self.step, "micro": [vars(m) for m in self.micro], "logs": self.logs,
                "scales": list(self.scales)}

    @classmethod
    def from_state(cls, state: dict) -> Rollout:
        return cls(state["step"], [MicroRollout(**m) for m in state["micro"]], state["logs"], tuple(state["scales"]))


def training_batch(prompts: PromptBatch, micro: MicroRollout, args: GRPOArgs, collator: ChatCollator,
                   scales: tuple[float, float]) -> GRPOBatch:
    """The training rows of a micro-batch of prompts: each prompt followed by each of its completions, one row each
    (padded, or one packed row), sharing the prompt's tiles; ``scales`` = (token_scale, row_scale)."""
    rows, owners = [], []
    for p, sample in enumerate(prompts.samples):
        for k in range(args.num_generations):
            completion = torch.tensor(micro.completions[p * args.num_generations + k], dtype=torch.long)
            prompt = sample["input_ids"]
            rows.append({"input_ids": torch.cat([prompt, completion]),
                         "labels": torch.cat([torch.full_like(prompt, IGNORE_INDEX), completion])})
            owners.append(p)
    fields = collator.fields(rows, prompts.samples, owners)
    tokens = len(fields["loss_index"])
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float32) if v is not None else None  # noqa: E731
    return GRPOBatch(**fields, weight=float(loss_weight(args.loss_type, len(rows), tokens)), rows=len(rows),
                     advantages=torch.tensor(micro.advantages, dtype=torch.float32),
                     old_log_probs=as_tensor(micro.old_log_probs), ref_log_probs=as_tensor(micro.ref_log_probs),
                     token_scale=scales[0], row_scale=scales[1])


class GRPORecipe(ReferenceRecipe):
    """GRPO / GSPO for ``train/trainer.py``: prompt lines, rollouts in :meth:`prepare_step`, the policy loss."""

    dataset_class, collator_class = PromptDataset, PromptCollator

    def __init__(self, model: ModelArgs, data: DataConfig, args: GRPOArgs, collectives):
        super().__init__(model, data)
        if data.eval_meta_path:
            raise UserError(f"--eval_meta_path: validation is not implemented for --objective {args.objective} (a "
                            "validation loss of sampled completions says little); drop it and follow the rewards "
                            "in metrics.jsonl")
        self.grpo = args.resolve()
        self.name = self.objective = self.grpo.objective
        self.collectives = collectives
        self.rewards = RewardSet.from_flags(self.grpo.reward_funcs, self.grpo.reward_weights)  # user code fails early
        self.rollout: Rollout | None = None
        self.generator: Generator | None = None
        self.device = torch.device("cpu")

    @classmethod
    def from_objective(cls, model: ModelArgs, data: DataConfig, args: GRPOArgs, collectives) -> GRPORecipe:
        return cls(model, data, args, collectives)

    # ---- model and data
    def build_module(self, dtype: torch.dtype, weights: bool = True, device="cpu") -> GRPOTrainModule:
        self.device = torch.device(device)
        return super().build_module(dtype, weights, device)

    def _training_module(self, chat, dtype: torch.dtype, weights: bool) -> GRPOTrainModule:
        reference = self._reference_chat(chat, dtype, weights) if self.grpo.beta else None
        return GRPOTrainModule(chat, self.grpo, reference)

    def build_data(self, seed: int, rank: int, world_size: int, per_device_batch: int, grad_accum: int):
        """Prompt lines; each micro-batch holds ``per_device_batch`` prompts (x ``--num_generations`` rows)."""
        d, chat = self.data, self.chat
        train = PromptDataset(d.meta_path, chat.tokenizer, d, is_train=True, seed=seed,
                              completion_tokens=self.grpo.max_completion_length)
        tok = chat.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.rows_collator = ChatCollator(d.use_packed_ds, self.pad_id, chat.img_context_token_id,
                                          chat.num_image_token, "token")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.lengths, self.train_set = train.lengths, train
        sampler = GlobalBatchSampler(train.lengths, per_device_batch, world_size, rank, grad_accum, seed,
                                     d.group_by_length)
        collate = PromptCollator(self.pad_id, chat.img_context_token_id, chat.num_image_token)
        return train, None, collate, RepeatedSteps(sampler, self.grpo.num_iterations)

    def tokens_per_micro_batch(self, per_device_batch: int) -> int:
        """The rows of a micro-batch: each prompt with each of its completions, at their longest."""
        return per_device_batch * self.grpo.num_generations * (max(self.lengths) + self.grpo.max_completion_length)

    def describe(self) -> list[str]:
        reference = self.reference_line() if self.grpo.beta else "no reference model (--beta 0)"
        cache = "static" if self._static() else "dynamic"
        return super().describe() + [f"objective {self.grpo.describe()}; {reference}; generation: {cache} KV cache"
                                     + (", compiled decode step" if self._compiled() else "")]

    def _static(self) -> bool:
        choice = self.grpo.cache_implementation
        return choice == "static" if choice else self._compiled()

    def _compiled(self) -> bool:
        """The static decode step is compiled (CUDA graphs) on one GPU; several ranks decode eagerly."""
        return self.device.type == "cuda" and self.grpo.cache_implementation != "dynamic" and self.world_size == 1

    # ---- the step
    def prepare_step(self, module: GRPOTrainModule, batches: list[PromptBatch], context: StepContext) -> PreparedStep:
        start = context.step - context.step % self.grpo.num_iterations
        if self.rollout is None or self.rollout.step != start:
            self.rollout = self._roll_out(module, batches, start)
            if context.is_main and context.logged:
                self._log_completions(context, batches)
        else:
            self._keep_old_log_probs(module)
        train = [self._training_batch(b, m) for b, m in zip(batches, self.rollout.micro)]
        return PreparedStep(train, dict(self.rollout.logs))

    def _keep_old_log_probs(self, module: GRPOTrainModule) -> None:
        """The first update's log-probabilities of a block become pi_old for its later updates."""
        if module.captured:
            for micro, old in zip(self.rollout.micro, module.captured):
                micro.old_log_probs = old.float().cpu().tolist()
            module.captured.clear()

    def _sampling(self) -> Sampling:
        """Stop at the template's end of turn (as ``InternVLChat.chat``) or the tokenizer's end of text; never sample
        an image token."""
        tok = self.chat.tokenizer
        stop = set()
        sep = get_template(self.data.conv_style).sep.strip()
        if sep:
            sep_id = tok.convert_tokens_to_ids(sep)
            if sep_id is not None and sep_id != tok.unk_token_id:
                stop.add(sep_id)
        if tok.eos_token_id is not None:
            stop.add(tok.eos_token_id)
        g = self.grpo
        image_tokens = tuple(tok.convert_tokens_to_ids(t) for t in (IMG_CONTEXT_TOKEN, IMG_START_TOKEN, IMG_END_TOKEN))
        return Sampling(g.max_completion_length, g.temperature, g.top_p, g.top_k, tuple(sorted(stop)), self.pad_id,
                        image_tokens)

    @torch.no_grad()
    def _roll_out(self, module: GRPOTrainModule, batches: list[PromptBatch], step: int) -> Rollout:
        g, chat, device = self.grpo, module.chat, self.device
        if self.generator is None:
            self.generator = Generator(module.model, static=self._static(), compile=self._compiled())
        sampling = self._sampling()
        was_training = module.training
        module.eval()
        generated, started = [], time.perf_counter()
        with self.collectives.gathered(module):
            for b in batches:
                b = b.to(device)
                embeds = chat.embed_inputs(b.input_ids, b.pixel_values, layout={
                    "image_tiles": b.image_tiles, "image_positions": b.image_positions})
                keys = torch.tensor([stream_key(self.seed, step, s["index"], k) for s in b.samples
                                     for k in range(g.num_generations)], device=device)
                generated.append(self.generator.generate(embeds, b.attention_mask, sampling, keys, g.num_generations,
                                                         all_reduce_sum=self.collectives.all_reduce_sum))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            micro, weighted, stats, log_rows = self._score(batches, generated)
            logs, scales = self._global_logs(stats, micro, weighted, len(batches))
            if g.beta:
                for b, m in zip(batches, micro):
                    rows = self._training_batch(b, m, scales).to(device)
                    m.ref_log_probs = module.reference_log_probs(rows).float().cpu().tolist()
        module.train(was_training)
        logs["time/generation_s"] = seconds
        # a reward that applied to no completion of the step has no mean: left out rather than logged as NaN
        return Rollout(step, micro, {k: v for k, v in logs.items() if not math.isnan(v)}, scales, log_rows)

    def _score(self, batches: list[PromptBatch], generated) -> tuple[list[MicroRollout], torch.Tensor, dict, list]:
        """The completions' token ids and weighted rewards (NaN: no reward applies), this rank's sums for the global
        statistics, and the first micro-batch's prompts, completions and rewards for ``completions.jsonl``."""
        g = self.grpo
        micro, per_func, weighted_all, lengths, truncated, log_rows = [], [], [], [], [], []
        for b, out in zip(batches, generated):
            tokens, n = out.tokens.cpu(), out.lengths.cpu()
            ids = [tokens[r, : int(n[r])].tolist() for r in range(tokens.shape[0])]
            texts = self.chat.tokenizer.batch_decode(ids, skip_special_tokens=True)
            owners = [s for s in b.samples for _ in range(g.num_generations)]
            rewards = self.rewards([s["prompt"] for s in owners], texts, ids, [s["fields"] for s in owners],
                                   [s["where"] for s in owners])
            weighted = torch.where(torch.isnan(rewards).all(dim=1), torch.full_like(rewards[:, 0], math.nan),
                                   (rewards * self.rewards.weights).nansum(dim=1))
            micro.append(MicroRollout(ids, []))
            per_func.append(rewards)
            weighted_all.append(weighted)
            lengths.append(n.float())
            truncated.append((~out.stopped.cpu()).float())
            if not log_rows:  # a sample of the step: the first micro-batch's prompts and completions
                log_rows = [{"sample_id": s["sample_id"], "prompt": s["prompt"], "completion": t,
                                   "rewards": dict(zip(self.rewards.names, [None if math.isnan(v) else v
                                                                             for v in r.tolist()])),
                                   "reward": None if math.isnan(w) else float(w)}
                                  for s, t, r, w in zip(owners, texts, rewards, weighted.tolist())]
        rewards, weighted = torch.cat(per_func), torch.cat(weighted_all)
        lengths, truncated = torch.cat(lengths), torch.cat(truncated)
        grouped = weighted.view(-1, g.num_generations)
        finite = ~torch.isnan(weighted)
        stats = {
            "completions": len(weighted), "tokens": float(lengths.sum()), "truncated": float(truncated.sum()),
            "min_length": float(lengths.min()), "max_length": float(lengths.max()),
            "reward": [float(weighted[finite].sum()), float((weighted[finite] ** 2).sum()), int(finite.sum())],
            "funcs": [[float(torch.nansum(c)), float(torch.nansum(c ** 2)), int((~torch.isnan(c)).sum())]
                      for c in rewards.T],
            "groups": grouped.shape[0],
            "zero_std_groups": int((torch.nan_to_num(grouped.max(1).values - grouped.min(1).values, 0.0) == 0).sum()),
        }
        return micro, weighted, stats, log_rows

    def _global_logs(self, stats: dict, micro: list[MicroRollout], weighted: torch.Tensor,
                     micro_batches: int) -> tuple[dict, tuple]:
        """Sum the ranks' statistics (one gather), fill the advantages and return the step's logs and scales."""
        g = self.grpo
        every = self.collectives.all_gather_objects([stats])
        total = lambda key: sum(s[key] for s in every)  # noqa: E731

        def mean_std(parts: list) -> tuple[float, float]:
            s, sq, n = (sum(p[i] for p in parts) for i in range(3))
            if n == 0:
                return math.nan, math.nan
            mean = s / n
            return mean, math.sqrt(max(sq - n * mean * mean, 0.0) / (n - 1)) if n > 1 else math.nan

        reward_mean, reward_std = mean_std([s["reward"] for s in every])
        adv = advantages(weighted, g.num_generations, g.scale_rewards,
                         torch.tensor(reward_std) if g.scale_rewards == "batch" else None)
        start = 0
        for m in micro:
            m.advantages = adv[start : start + len(m.completions)].tolist()
            start += len(m.completions)
        completions, tokens = total("completions"), total("tokens")
        weight = {"grpo": completions, "dr_grpo": completions, "dapo": tokens,
                  "bnpo": micro_batches * len(every)}[g.loss_type]
        logs = {"reward": reward_mean, "reward_std": reward_std}
        for j, name in enumerate(self.rewards.names):
            logs[f"rewards/{name}/mean"], logs[f"rewards/{name}/std"] = mean_std([s["funcs"][j] for s in every])
        logs.update({"frac_reward_zero_std": total("zero_std_groups") / total("groups"),
                     "completions/mean_length": tokens / completions,
                     "completions/min_length": min(s["min_length"] for s in every),
                     "completions/max_length": max(s["max_length"] for s in every),
                     "completions/clipped_ratio": total("truncated") / completions})
        return logs, (weight / tokens, weight / completions)

    def _training_batch(self, prompts: PromptBatch, micro: MicroRollout, scales: tuple | None = None) -> GRPOBatch:
        return training_batch(prompts, micro, self.grpo, self.rows_collator, scales or self.rollout.scales)

    def _log_completions(self, context: StepContext, batches: list[PromptBatch]) -> None:
        """Append the step's sample of prompts, completions and rewards to ``completions.jsonl`` (rank 0)."""
        with open(context.output_dir / COMPLETIONS_LOG, "a", encoding="utf-8") as f:
            for row, adv in zip(self.rollout.log_rows, self.rollout.micro[0].advantages):
                f.write(json.dumps({"step": context.step + 1, **row, "advantage": adv}, ensure_ascii=False) + "\n")

    # ---- run state
    def run_state(self) -> dict:
        """The current block's completions, when a checkpoint falls inside a ``--num_iterations`` block (every rank's,
        gathered: each resumes its own)."""
        if self.grpo.num_iterations == 1 or self.rollout is None:
            return {}
        self._keep_old_log_probs(self.module)
        return {"rollouts": self.collectives.all_gather_objects([self.rollout.state()])}

    def load_run_state(self, state: dict) -> None:
        """Each rank takes its own block of completions back; resumed on another number of processes (whose ranks
        hold other prompts) the rest of the block samples afresh."""
        rollouts = state.get("rollouts")
        if rollouts and len(rollouts) == self.world_size:
            self.rollout = Rollout.from_state(rollouts[self.rank])
