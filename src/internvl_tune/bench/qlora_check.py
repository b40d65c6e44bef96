"""QLoRA on one GPU: a random-weight InternVL2 shape with 4-bit LLM linears trains a few LoRA steps; the measured
peak memory against the estimate ``internvl-tune train`` prints.

Run on a GPU box with bitsandbytes installed (``pip install bitsandbytes``, or its wheel carried there):
``internvl-tune bench qlora --shape internvl2-76b --steps 6``. The model is built on the meta device and filled
tensor by tensor with random bf16 weights on the GPU, each LLM linear quantized to NF4 as it is filled (as loading a
checkpoint does: the bf16 LLM never exists whole). Then the trainer's path: LoRA of rank ``--lora_rank`` on every
LLM linear (peft's 4-bit layers), fp32 master LoRA weights, activation checkpointing of every block, FSDP2 on one
rank, fused AdamW, packed synthetic rows of ``--packed_tokens``. Prints the estimate, the peak, the losses and the
step time; exits 1 when the peak exceeds the estimate by more than 10 % or a loss is not finite.
``--estimate_only`` prints the estimate alone, without a GPU (the model stays on the meta device).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from internvl_tune.bench.common import materialize, synthetic_samples
from internvl_tune.bench.shapes import SHAPES, native_config
from internvl_tune.cli.flags import description


def build_chat(shape: str, device: torch.device, lora_rank: int, lora_dropout: float):
    """An ``InternVLChat`` of ``shape`` with NF4 LLM linears, random weights on ``device`` (meta: none) and LoRA."""
    from internvl_tune.models.common.quantize import is_4bit, quantize_as, to_4bit_linears
    from internvl_tune.models.internvl_chat.chat import InternVLChat
    from internvl_tune.models.internvl_chat.config import original_from_native
    from internvl_tune.models.internvl_chat.loading import build_empty_model
    from internvl_tune.models.internvl_chat.lora import add_lora
    from internvl_tune.train.optim import fp32_master_weights

    cfg = native_config(shape)
    model = build_empty_model(cfg).to(torch.bfloat16)  # still on the meta device
    to_4bit_linears(model.model.language_model, compute_dtype=torch.bfloat16)
    model.is_loaded_in_4bit = True
    if device.type != "meta":
        gen = torch.Generator(device).manual_seed(0)
        for name, empty in list(model.named_parameters()):
            if empty.ndim == 1:  # norm weights 1, biases 0
                value = torch.full(empty.shape, float("norm" in name), dtype=torch.bfloat16, device=device)
            else:
                value = 0.02 * torch.randn(empty.shape, dtype=torch.bfloat16, device=device, generator=gen)
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent)._parameters[leaf] = quantize_as(empty, value, device) if is_4bit(empty) \
                else nn.Parameter(value, requires_grad=False)
        model.to(device)  # the buffers
    # token ids come in directly: a stand-in tokenizer only names the image token's id
    tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda token: cfg.image_token_id, pad_token_id=0)
    chat = InternVLChat(model, tokenizer, original_from_native(cfg.to_dict()))
    chat.model.requires_grad_(False)
    add_lora(chat, llm_rank=lora_rank, lora_dropout=lora_dropout)
    fp32_master_weights(chat.model)
    return chat


def estimate(module, blocks, chat, packed_tokens: int, lora_dropout: float):
    """The trainer's memory estimate for this run (bf16 compute, every block checkpointed, eager; frozen ViT)."""
    from internvl_tune.models.internvl_chat.recipe import memory_shape
    from internvl_tune.train.memory import estimate_training_memory

    shape = memory_shape(chat, packed_tokens, lora_dropout, tiles_per_micro_batch=0)
    return estimate_training_memory(module, blocks, world_size=1, grad_checkpoint=1.0, **shape)


def run(shape: str, device: torch.device, steps: int, packed_tokens: int, lora_rank: int,
        lora_dropout: float, estimate_only: bool = False) -> dict:
    """Build, (train,) measure; the result row."""
    from internvl_tune.data.batching import ChatCollator, PackedBatchSampler
    from internvl_tune.dist import init_distributed
    from internvl_tune.dist.parallelize import parallelize
    from internvl_tune.models.common.quantize import check_4bit_device
    from internvl_tune.models.internvl_chat.recipe import ChatTrainModule
    from internvl_tune.train.optim import build_adamw, build_param_groups, count_parameters
    from internvl_tune.train.schedule import LRSchedule
    from internvl_tune.train.step import StepRunner

    if not estimate_only:
        check_4bit_device(device)
    start = time.perf_counter()
    chat = build_chat(shape, torch.device("meta") if estimate_only else device, lora_rank, lora_dropout)
    module = ChatTrainModule(chat)
    trainable, total = count_parameters(module)
    row = {"shape": shape, "lora_rank": lora_rank, "packed_tokens": packed_tokens, "params": total,
           "trainable": trainable}
    if estimate_only:
        row["estimate"] = estimate(module, module.blocks(), chat, packed_tokens, lora_dropout)
        return row
    row["build_s"] = time.perf_counter() - start
    info = init_distributed(device.type)
    blocks = parallelize(module, module.blocks(), world_size=1, param_dtype=torch.bfloat16, grad_checkpoint=1.0)
    row["estimate"] = estimate(module, blocks, chat, packed_tokens, lora_dropout)
    optimizer = build_adamw(build_param_groups(module.named_parameters(), 1e-4, 0.0), (0.9, 0.999), 1e-8)
    stepper = StepRunner(module, optimizer, LRSchedule("constant", 0, 10**6), info, 1.0)
    cfg = chat.model.config
    samples = synthetic_samples(4 * steps, seed=0, tiles=(1, 6), text=(256, 2048))
    packer = PackedBatchSampler([s.tokens for s in samples], packed_tokens, 1, 0, 1, seed=0,
                                tiles=[s.tiles for s in samples], max_tiles=64)
    packs = [p for _, micros in packer.epoch_steps(0) for p in micros][:steps]
    collate = ChatCollator(True, 0, chat.img_context_token_id, chat.num_image_token)
    data = [materialize(s, cfg.image_token_id, cfg.text_config.vocab_size, i) for i, s in enumerate(samples)]
    losses, times = [], []
    for step, pack in enumerate(packs):
        batch = collate([data[i] for i in pack])
        batch = dataclasses.replace(batch, pixel_values=batch.pixel_values.to(torch.bfloat16))
        begin = time.perf_counter()
        losses.append(stepper([batch], step).result()["loss"])
        times.append(time.perf_counter() - begin)
    cuda = device.type == "cuda"
    row.update(losses=losses, step_s=times, peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
               reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0.0)
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="internvl2-76b", choices=sorted(SHAPES), help="architecture to build")
    parser.add_argument("--steps", type=int, default=6, help="LoRA training steps")
    parser.add_argument("--packed_tokens", type=int, default=4096, help="LLM tokens per packed row (micro-batch)")
    parser.add_argument("--lora_rank", type=int, default=16, help="LoRA rank on every LLM linear")
    parser.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout (the reference's 0.05)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of a small shape")
    parser.add_argument("--estimate_only", action="store_true", help="print the estimate alone (no GPU needed)")
    parser.add_argument("--out", default=None, help="also write the result row as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    row = run(args.shape, torch.device(args.device), args.steps, args.packed_tokens, args.lora_rank,
              args.lora_dropout, args.estimate_only)
    est = row["estimate"]
    print(f"{args.shape}: {row['params'] / 1e9:.2f}B parameters, {row['trainable'] / 1e6:.1f}M trainable "
          f"(LoRA r{args.lora_rank}), {args.packed_tokens} tokens per step; {est.describe()}")
    row["estimate_gib"] = est.total
    row["estimate"] = vars(est)
    ok = True
    if not args.estimate_only:
        print(f"built in {row['build_s']:.0f} s; peak {row['peak_gib']:.1f} GiB allocated, "
              f"{row['reserved_gib']:.1f} GiB reserved; losses {' '.join(f'{x:.4f}' for x in row['losses'])}; "
              f"step {min(row['step_s']):.2f}-{max(row['step_s']):.2f} s")
        ok = all(math.isfinite(x) for x in row["losses"]) and row["peak_gib"] <= 1.1 * est.total
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
