"""The baselines: training loops as a user writes them with transformers (+ peft) alone, on the benchmark's shapes.

- :class:`PlainLoop`: fp32 parameters + bf16 autocast, SDPA, batch 1, frozen vision tower, full-vocabulary loss
  inside ``model(..., labels=...)``, ``torch.optim.AdamW``. Its LoRA form is what a user writes with transformers +
  peft: a bf16 base, peft LoRA on q/k/v/o/gate/up/down (alpha 2r, dropout 0.05), optional gradient checkpointing.
  A mixture-of-experts LLM (InternVL3.5-30B-A3B, GPT-OSS) runs transformers' own experts forward (``grouped_mm``, its
  default) and gets peft's LoRA on the grouped experts too (``target_parameters``, as ours puts LoRA on them), with
  dropout 0: peft refuses dropout on expert LoRA.
- :class:`PlainDPOLoop`: DPO as trl users write it, without trl: one pair per step, chosen and rejected answers as
  two padded rows of one batch (the pixels repeated for both, as InternVL's ``MultimodalDPOTrainer`` does), a
  reference forward with peft's ``disable_adapter()`` under ``no_grad``, the policy forward, per-row sums of the
  answer tokens' log-probabilities from full-vocabulary ``log_softmax``, the sigmoid loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from internvl_tune.bench.common import SyntheticSample, materialize, param_counts, step_flops
from internvl_tune.bench.compare import MemoryWatch, Repeat, flatten, timed
from internvl_tune.bench.shapes import native_config
from internvl_tune.constants import IGNORE_INDEX

LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
WARM_SAMPLES = 2  # an eager loop needs no compilation: two samples warm the allocator and cuBLAS


def plain_model(shape: str, device: torch.device, lora_rank: int, grad_checkpoint: bool,
                llm_layers: int | None = None):
    """``(model, config, parameter counts)``: the shape with random weights as a user sets it up (see above)."""
    from transformers import InternVLForConditionalGeneration

    from internvl_tune.models.common.moe import EXPERT_LORA_PARAMS
    from internvl_tune.models.internvl_chat import families

    cfg = native_config(shape, "sdpa", llm_layers)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if lora_rank else torch.float32)  # built in its dtype: no fp32 copy
    try:
        with device:
            model = InternVLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default)
    model.model.vision_tower.requires_grad_(False)
    counts = param_counts(model)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        moe = families.by_native_type(cfg.text_config.model_type).moe
        experts = dict(target_parameters=[f"{moe.experts}.{p}" for p in EXPERT_LORA_PARAMS]) if moe else {}
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                 lora_dropout=0.0 if moe else 0.05, target_modules=LORA_TARGETS,
                                                 **experts))
    if grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, cfg, counts


class BatchOneLoop:
    """A loop that takes the samples of the packs it is given one at a time; subclasses define ``_steps``."""

    device: torch.device
    memory: MemoryWatch

    def _steps(self, indices: list[int]) -> tuple[int, float, float, int]:
        """Train on samples ``indices``, one per step: ``(tokens, model FLOPs, last loss, samples)``."""
        raise NotImplementedError

    def prepare(self, packs: list[list[int]]) -> None:
        """Nothing to do: the samples' tensors are built once, when the loop is."""

    def warm(self, packs: list[list[int]]) -> None:
        with self.memory.holding():  # the optimizer state
            self._steps([p[0] for p in flatten(packs)][:WARM_SAMPLES])

    def run(self, packs: list[list[int]]) -> Repeat:
        return timed(self.device, lambda: self._steps([p[0] for p in flatten(packs)]), self.memory)


class PlainLoop(BatchOneLoop):
    """The plain transformers (+ peft) fine-tuning loop on synthetic samples, batch 1 (see the module docstring)."""

    def __init__(self, shape: str, samples: list[SyntheticSample], device: torch.device, lora_rank: int = 0,
                 grad_checkpoint: bool = False, llm_layers: int | None = None):
        self.device, self.samples, self.lora = device, samples, bool(lora_rank)
        self.memory = MemoryWatch(device)
        with self.memory.holding():
            self.model, cfg, self.counts = plain_model(shape, device, lora_rank, grad_checkpoint, llm_layers)
        self.text_config = cfg.text_config
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.data = [materialize(s, cfg.image_token_id, cfg.text_config.vocab_size, i) for i, s in enumerate(samples)]
        self.pixel_dtype = torch.bfloat16 if lora_rank else torch.float32
        self.name = "plain transformers loop" + (f" + peft LoRA r{lora_rank}" if lora_rank else "")
        self.name += " + grad ckpt" if grad_checkpoint else ""

    def _steps(self, indices: list[int]) -> tuple[int, float, float, int]:
        tokens, loss = 0, None
        for i in indices:
            b = self.data[i]
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                out = self.model(input_ids=b["input_ids"][None].to(self.device),
                                 labels=b["labels"][None].to(self.device),
                                 pixel_values=b["pixel_values"].to(self.device, self.pixel_dtype))
            out.loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            tokens += len(b["input_ids"])
            loss = out.loss.detach()
        flops = step_flops(self.counts, self.text_config, [self.samples[i] for i in indices], self.lora)
        return tokens, flops, float(loss), len(indices)



def answer_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of the log-probabilities of the supervised next tokens (trl's ``get_batch_logps``)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1]
    mask = labels != IGNORE_INDEX
    labels[~mask] = 0
    per_token = torch.gather(logits.float().log_softmax(-1), 2, labels[..., None]).squeeze(2)
    return (per_token * mask).sum(-1)


class PlainDPOLoop(BatchOneLoop):
    """DPO with plain transformers + peft (see the module docstring), one pair per step; ``pair(i)`` gives pair
    ``i``'s tensors (``chosen_input_ids``/``chosen_labels``/``rejected_input_ids``/``rejected_labels``/
    ``pixel_values``)."""

    def __init__(self, shape: str, pair: Callable[[int], dict], device: torch.device, lora_rank: int = 16,
                 grad_checkpoint: bool = True, beta: float = 0.1, pad_token_id: int = 0):
        self.device, self.pair, self.beta, self.pad = device, pair, beta, pad_token_id
        self.memory = MemoryWatch(device)
        with self.memory.holding():
            self.model, _, _ = plain_model(shape, device, lora_rank, grad_checkpoint)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.name = f"plain transformers + peft DPO loop, LoRA r{lora_rank}" + (" + grad ckpt" if grad_checkpoint else "")

    def _rows(self, pair: dict) -> dict:
        chosen, rejected = pair["chosen_input_ids"], pair["rejected_input_ids"]
        length = max(len(chosen), len(rejected))
        ids = torch.full((2, length), self.pad, dtype=torch.long)
        labels = torch.full((2, length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((2, length), dtype=torch.long)
        for row, side in enumerate(("chosen", "rejected")):
            n = len(pair[f"{side}_input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = pair[f"{side}_input_ids"], pair[f"{side}_labels"], 1
        pixels = torch.cat([pair["pixel_values"]] * 2).to(self.device, torch.bfloat16)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "pixel_values": pixels,
                "labels": labels.to(self.device)}

    def _steps(self, indices: list[int]) -> tuple[int, float, float, int]:
        tokens, loss = 0, None
        for i in indices:
            pair = self.pair(i)
            rows = self._rows(pair)
            labels = rows.pop("labels")
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                with torch.no_grad(), self.model.disable_adapter():
                    reference = answer_log_probs(self.model(**rows).logits, labels)
                policy = answer_log_probs(self.model(**rows).logits, labels)
            margin = (policy[0] - reference[0]) - (policy[1] - reference[1])
            loss = -F.logsigmoid(self.beta * margin)
            loss.backward()
            loss = loss.detach()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            tokens += len(pair["chosen_input_ids"]) + len(pair["rejected_input_ids"])
        return tokens, 0.0, float(loss), len(indices)

