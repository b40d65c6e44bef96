"""Our training path on a random-weight InternVL2 shape: the same modules the trainer uses, fed synthetic packs."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import torch

from internvl_tune.bench.common import materialize, param_counts, step_flops
from internvl_tune.bench.shapes import native_config
from internvl_tune.data.batching import ChatCollator, PackedBatchSampler
from internvl_tune.dist import init_distributed
from internvl_tune.dist.parallelize import parallelize, parse_grad_checkpoint
from internvl_tune.models.common import varlen_attention
from internvl_tune.models.internvl_chat.chat import InternVLChat
from internvl_tune.models.internvl_chat.config import original_from_native
from internvl_tune.models.internvl_chat.recipe import ChatTrainModule, memory_shape
from internvl_tune.train.memory import estimate_training_memory
from internvl_tune.train.optim import build_adamw, build_param_groups, fp32_master_weights
from internvl_tune.train.schedule import LRSchedule
from internvl_tune.train.step import StepRunner


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_chat(shape: str, attn: str, device: torch.device) -> InternVLChat:
    """A random-weight InternVL2 of ``shape``: frozen ViT in bf16, trainable LLM + projector in fp32 (master)."""
    from transformers import InternVLForConditionalGeneration

    cfg = native_config(shape, attn)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: a 26B shape would not fit in fp32
    try:
        with device:
            model = InternVLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default)
    model.model.vision_tower.requires_grad_(False)
    # The benchmark feeds token ids directly, so a stand-in tokenizer only has to name the image token's id.
    tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda token: cfg.image_token_id, pad_token_id=0)
    return InternVLChat(model, tokenizer, original_from_native(cfg.to_dict()))


def run_ours(shape: str, samples, device, warmup: int, packed_tokens: int, compile: bool = False,
             grad_checkpoint: str = "False", lora_rank: int = 0, steps: int | None = None, profile: bool = False) -> dict:
    """Train on packs of ``samples`` as ``internvl-tune train`` does and time it: tokens/s, TFLOP/s, peak memory."""
    info = init_distributed(device.type)
    cuda = device.type == "cuda"
    chat = build_chat(shape, "sdpa", device)
    counts = param_counts(chat.model)
    if lora_rank:
        from internvl_tune.models.internvl_chat.lora import add_lora

        chat.model.requires_grad_(False)
        add_lora(chat, llm_rank=lora_rank)
    fp32_master_weights(chat.model)
    module = ChatTrainModule(chat)
    mode = parse_grad_checkpoint(grad_checkpoint)
    blocks = parallelize(module, module.blocks(), world_size=1, param_dtype=torch.bfloat16, grad_checkpoint=mode,
                         compile=compile)
    shape = memory_shape(chat, packed_tokens, lora_dropout=0.05 if lora_rank else 0.0, tiles_per_micro_batch=64)
    estimate = estimate_training_memory(module, blocks, world_size=1, grad_checkpoint=mode, compiled=compile, **shape)
    groups = build_param_groups(module.named_parameters(), 1e-5, 0.0)
    optimizer = build_adamw(groups, (0.9, 0.999), 1e-8)
    stepper = StepRunner(module, optimizer, LRSchedule("constant", 0, 10**6), info, 1.0)
    cfg = chat.model.config
    lengths = [s.tokens for s in samples]
    packer = PackedBatchSampler(lengths, packed_tokens, 1, 0, 1, seed=0, tiles=[s.tiles for s in samples], max_tiles=64)
    packs = [p for _, micros in packer.epoch_steps(0) for p in micros]
    if steps is not None:
        packs = (packs * (1 + (steps + warmup) // len(packs)))[: steps + warmup]
    data = {i: materialize(s, cfg.image_token_id, cfg.text_config.vocab_size, i) for i, s in enumerate(samples)}
    collate = ChatCollator(True, 0, chat.img_context_token_id, chat.num_image_token)
    batches = []
    for p in packs:  # as the data loader hands them over: bf16 pixels, pinned memory
        batch = collate([data[i] for i in p])
        batch = dataclasses.replace(batch, pixel_values=batch.pixel_values.to(torch.bfloat16))
        batches.append(batch.pin_memory() if cuda else batch)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    tokens, timed, start, previous = 0, [], None, None
    for i, batch in enumerate(batches):
        if i == warmup:
            _sync(device)
            start, tokens = time.perf_counter(), 0
        if profile and i == warmup - 1:
            _profile_step(stepper, batch, i, device)
            continue
        pending = stepper([batch], i)
        if previous is not None:  # as the trainer: read step n - 1 back while step n runs
            last = previous.result()
        previous = pending
        if i >= warmup:
            tokens += batch.num_tokens
            timed.extend(packs[i])
    last = previous.result()
    _sync(device)
    elapsed = time.perf_counter() - start
    timed_samples = [samples[i] for i in timed]
    flops = step_flops(counts, cfg, timed_samples)
    if lora_rank:  # a frozen LLM costs 4·N·T (forward + input gradients), not 6·N·T
        flops -= 2 * counts["llm"] * sum(s.tokens for s in timed_samples)
    name = "ours" + (" + compile" if compile else "") + (f" + ckpt {grad_checkpoint}" if mode else "")
    name += f" + LoRA r{lora_rank}" if lora_rank else ""
    return {"variant": name, "tokens_per_s": tokens / elapsed, "tflops": flops / elapsed / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
            "padding_waste": packer.padding_waste(), "loss_last": last["loss"], "estimate_gib": estimate.total,
            "varlen_kernel": varlen_attention.VARLEN_KERNEL is not None, **_compile_stats(compile)}


def _profile_step(stepper: StepRunner, batch: dict, step: int, device: torch.device) -> None:
    """Run one step under the PyTorch profiler; print the top kernels and the GPU's busy share of the wall time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    wall = time.perf_counter()
    with profile(activities=acts) as prof:
        stepper([batch], step).result()
        _sync(device)
    wall = time.perf_counter() - wall
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6 if cuda else 0.0
    print(f"profiled step: {wall * 1e3:.1f} ms wall, {busy * 1e3:.1f} ms of GPU kernels", flush=True)
    print(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30,
                       max_name_column_width=60), flush=True)
    print(events.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60), flush=True)


def _compile_stats(compiled: bool) -> dict:
    """How many graphs ``torch.compile`` built (one per distinct guard set; a growing count means recompiles)."""
    if not compiled:
        return {}
    from torch._dynamo.utils import counters

    return {"compiled_graphs": int(counters["stats"]["unique_graphs"])}
