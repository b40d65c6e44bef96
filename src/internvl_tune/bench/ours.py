"""Our training path on a random-weight InternVL2 shape: the same modules the trainer uses, fed synthetic packs.

:class:`StepLoop` runs the trainer's step (``train.step.StepRunner``: fused AdamW, no host sync inside a step, the
previous step read back while the next runs) on batches collated beforehand, as data-loader workers would hand them
over (bf16 pixels, pinned memory on a GPU). :func:`build_ours` sets it up for chat fine-tuning as ``internvl-tune
train --use_packed_ds True --bf16 True`` does; ``bench/preference.py`` sets it up for DPO / MPO.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

from internvl_tune.bench.common import SyntheticSample, materialize, param_counts, step_flops
from internvl_tune.bench.compare import MemoryWatch, Repeat, timed
from internvl_tune.bench.shapes import native_config
from internvl_tune.data.batching import ChatCollator, PackedBatchSampler
from internvl_tune.models.common import moe
from internvl_tune.models.common.moe import experts_modules
from internvl_tune.models.internvl_chat.chat import InternVLChat
from internvl_tune.models.internvl_chat.config import original_from_native


def build_chat(shape: str, attn: str, device: torch.device, llm_layers: int | None = None) -> InternVLChat:
    """A random-weight InternVL2 of ``shape`` (``llm_layers`` of its LLM layers) in bf16 with a frozen ViT (the
    trainer then keeps fp32 masters of what trains: ``train.optim.fp32_master_weights``)."""
    from transformers import InternVLForConditionalGeneration

    cfg = native_config(shape, attn, llm_layers)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: a 26B shape would not fit in fp32
    try:
        with device:
            model = InternVLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default)
    model.model.vision_tower.requires_grad_(False)
    if any(True for _ in experts_modules(model)):  # grouped experts, as load_pretrained sets for MoE checkpoints
        model.model.language_model.set_experts_implementation(moe.register())
    # The benchmark feeds token ids directly, so a stand-in tokenizer only has to name the image token's id.
    tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda token: cfg.image_token_id, pad_token_id=0)
    return InternVLChat(model, tokenizer, original_from_native(cfg.to_dict()))


def packs_of(samples: list[SyntheticSample], packed_tokens: int) -> tuple[list[list[int]], float]:
    """The packs of one epoch over ``samples`` (the trainer's packer, at most 64 tiles a pack) and their padding."""
    packer = PackedBatchSampler([s.tokens for s in samples], packed_tokens, 1, 0, 1, seed=0,
                                tiles=[s.tiles for s in samples], max_tiles=64)
    return [p for _, micros in packer.epoch_steps(0) for p in micros], packer.padding_waste()


def compiled_graphs() -> int:
    """How many graphs ``torch.compile`` has built in this process (a count that grows means recompilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class StepLoop:
    """Our trainer's step on pre-collated batches (see the module docstring).

    Args:
        name: the variant's name.
        module: the training module, ``parallelize``d, with its optimizer in ``stepper``.
        stepper: a ``train.step.StepRunner`` over ``module``.
        make_batch: pack (tuple of sample indices) -> the collated batch.
        flops: pack -> model FLOPs of a step on it.
        memory: holding what building the module allocated (``MemoryWatch.holding``).
        estimate_gib: what ``internvl-tune train`` prints as its memory estimate for this run.
    """

    def __init__(self, name: str, module: nn.Module, stepper, make_batch: Callable, flops: Callable,
                 device: torch.device, memory: MemoryWatch, estimate_gib: float, extra: dict | None = None):
        self.name, self.module, self.stepper, self.device, self.memory = name, module, stepper, device, memory
        self.make_batch, self.flops, self.estimate_gib = make_batch, flops, estimate_gib
        self.extra = extra or {}  # what the builder wants reported with the loop's numbers
        self.cache: dict[tuple, object] = {}
        self.step, self.nonfinite = 0, 0

    def batch(self, pack: list[int]):
        key = tuple(pack)
        if key not in self.cache:  # as the data loader hands it over: bf16 pixels, pinned memory on a GPU
            batch = self.make_batch(key)
            batch = dataclasses.replace(batch, pixel_values=batch.pixel_values.to(torch.bfloat16))
            self.cache[key] = batch.pin_memory() if self.device.type == "cuda" else batch
        return self.cache[key]

    def _steps(self, packs: list[list[int]]) -> tuple[int, float, float, int]:
        tokens, previous = 0, None
        for pack in packs:
            pending = self.stepper([self.batch(pack)], self.step)
            self.step += 1
            if previous is not None:  # as the trainer: read step n - 1 back while step n runs
                self._read(previous)
            previous = pending
            tokens += self.batch(pack).work
        last = self._read(previous)
        return tokens, sum(self.flops(tuple(p)) for p in packs), last["loss"], sum(len(p) for p in packs)

    def _read(self, pending) -> dict:
        result = pending.result()
        self.nonfinite += not result["finite"]
        return result

    def warm(self, packs: list[list[int]]) -> None:
        self.prepare(packs)
        with self.memory.holding():  # optimizer state, compiled graphs' constants
            self._steps(packs)

    def prepare(self, packs: list[list[int]]) -> None:
        """Collate ``packs`` now, so that no timed repeat collates."""
        for pack in packs:
            self.batch(pack)

    def run(self, packs: list[list[int]]) -> Repeat:
        return timed(self.device, lambda: self._steps(packs), self.memory)

    def profile(self, pack: list[int], forward_flops: float = 0.0, backward_flops: float = 0.0) -> dict:
        """One step on ``pack`` under the profiler (``bench/profile.py``)."""
        from internvl_tune.bench.profile import profile_step

        batch = self.batch(pack)

        def step():
            self._read(self.stepper([batch], self.step))
            self.step += 1

        inner = self.module.model.model  # the transformers InternVLModel: ViT, projector, language model
        marked = {"vision": inner.vision_tower, "language_model": inner.language_model}
        return profile_step(step, self.device, marked, forward_flops=forward_flops, backward_flops=backward_flops)


def prepare_step(module: nn.Module, chat: InternVLChat, device: torch.device, compile: bool, mode: float | str,
                 tokens_per_micro_batch: int, lora_dropout: float, lr: float = 1e-5):
    """``(stepper, memory estimate, mode, note)``: parallelize ``module`` as the trainer does on one GPU (bf16
    compute, fp32 masters), a fused AdamW and the trainer's memory estimate for packs of ``tokens_per_micro_batch``.
    ``mode`` ``"auto"`` is resolved as the trainer resolves ``--grad_checkpoint auto`` (``note`` says how)."""
    from internvl_tune.dist import init_distributed
    from internvl_tune.dist.parallelize import parallelize
    from internvl_tune.models.internvl_chat.recipe import memory_shape
    from internvl_tune.train.memory import estimate_training_memory
    from internvl_tune.train.optim import build_adamw, build_param_groups, fp32_master_weights
    from internvl_tune.train.schedule import LRSchedule
    from internvl_tune.train.step import StepRunner

    info = init_distributed(device.type)
    fp32_master_weights(chat.model)
    shape = memory_shape(chat, tokens_per_micro_batch, lora_dropout=lora_dropout, tiles_per_micro_batch=64)

    def estimate(fraction):
        return estimate_training_memory(module, module.blocks(), world_size=1, grad_checkpoint=fraction,
                                        compiled=compile, **shape)

    note = ""
    if mode == "auto":
        mode, note = auto_mode(estimate, device)
    parallelize(module, module.blocks(), world_size=1, param_dtype=torch.bfloat16, grad_checkpoint=mode,
                compile=compile)
    optimizer = build_adamw(build_param_groups(module.named_parameters(), lr, 0.0), (0.9, 0.999), 1e-8)
    return StepRunner(module, optimizer, LRSchedule("constant", 0, 10**6), info, 1.0), estimate(mode), mode, note


def auto_mode(estimate: Callable, device: torch.device) -> tuple[float, str]:
    """``--grad_checkpoint auto`` as ``train/trainer.py`` resolves it on one GPU: the fewest checkpointed blocks whose
    estimate + 15 % fits the free memory plus what this process already holds; every block without a GPU."""
    from internvl_tune.train.memory import choose_grad_checkpoint

    if device.type != "cuda":
        return 1.0, "auto: every block (no GPU memory to fit)"
    free, _ = torch.cuda.mem_get_info(device)
    available = (free + torch.cuda.memory_reserved(device)) / 2**30
    fraction, chosen = choose_grad_checkpoint(estimate, available)
    return fraction, f"auto: {fraction:g} of the blocks (estimate {chosen.total:.1f} GiB, +15 % fits {available:.1f} GiB)"


def variant_name(base: str, compile: bool, grad_checkpoint: str, mode: float | str, lora_rank: int) -> str:
    """``ours + compile + ckpt True + LoRA r16``: the variant as its options name it (``auto``: with its choice)."""
    ckpt = f"auto = {mode:g}" if str(grad_checkpoint).lower() == "auto" else grad_checkpoint
    return (base + (" + compile" if compile else "") + (f" + ckpt {ckpt}" if mode or ckpt != grad_checkpoint else "")
            + (f" + LoRA r{lora_rank}" if lora_rank else ""))


def build_ours(shape: str, samples: list[SyntheticSample], device: torch.device, packed_tokens: int,
               compile: bool = False, grad_checkpoint: str = "False", lora_rank: int = 0,
               llm_layers: int | None = None) -> StepLoop:
    """Chat fine-tuning as ``internvl-tune train --use_packed_ds True --bf16 True`` runs it, on packs of
    ``samples`` (frozen ViT; with ``lora_rank``: LoRA with dropout 0.05 on the LLM, the rest frozen)."""
    from internvl_tune.dist.parallelize import parse_grad_checkpoint
    from internvl_tune.models.internvl_chat.recipe import ChatTrainModule

    memory = MemoryWatch(device)
    with memory.holding():
        chat = build_chat(shape, "sdpa", device, llm_layers)
        counts = param_counts(chat.model)
        if lora_rank:
            from internvl_tune.models.internvl_chat.lora import add_lora

            chat.model.requires_grad_(False)
            add_lora(chat, llm_rank=lora_rank, expert_lora=chat.is_moe)  # MoE: the experts too (--moe_experts auto)
        module = ChatTrainModule(chat)
        stepper, estimate, mode, note = prepare_step(module, chat, device, compile,
                                                     parse_grad_checkpoint(grad_checkpoint), packed_tokens,
                                                     0.05 if lora_rank else 0.0)
    cfg = chat.model.config
    data = {}

    def sample(i: int) -> dict:
        if i not in data:
            data[i] = materialize(samples[i], cfg.image_token_id, cfg.text_config.vocab_size, i)
        return data[i]

    collate = ChatCollator(True, 0, chat.img_context_token_id, chat.num_image_token)
    return StepLoop(variant_name("ours", compile, grad_checkpoint, mode, lora_rank), module, stepper,
                    lambda pack: collate([sample(i) for i in pack]),
                    lambda pack: step_flops(counts, cfg.text_config, [samples[i] for i in pack], bool(lora_rank)),
                    device, memory, estimate.total, {"counts": counts, "text_config": cfg.text_config,
                                                     "lora": bool(lora_rank), "mode": mode, "auto": note,
                                                     "samples": samples})


def run_ours(shape: str, samples, device, warmup: int, packed_tokens: int, compile: bool = False,
             grad_checkpoint: str = "False", lora_rank: int = 0, steps: int | None = None) -> dict:
    """One timed run of our path after ``warmup`` steps (``steps`` packs, default one epoch): tokens/s, TFLOP/s,
    peak memory, the estimate. (A ratio to a plain loop comes from ``bench/compare.py``'s alternation instead.)"""
    from internvl_tune.bench.compare import schedule
    from internvl_tune.models.common import varlen_attention

    packs, waste = packs_of(samples, packed_tokens)
    warm, timed_packs = schedule(packs, warmup, steps if steps is not None else len(packs), 1)
    loop = build_ours(shape, samples, device, packed_tokens, compile, grad_checkpoint, lora_rank)
    loop.warm(warm)
    loop.prepare(timed_packs[0])
    r = loop.run(timed_packs[0])
    row = {"variant": loop.name, "tokens_per_s": r.tokens_per_s, "tflops": r.flops / r.seconds / 1e12,
           "peak_gib": r.peak_gib, "padding_waste": waste, "loss_last": r.loss, "estimate_gib": loop.estimate_gib,
           "varlen_kernel": varlen_attention.VARLEN_KERNEL is not None}
    return row | ({"compiled_graphs": compiled_graphs()} if compile else {})
