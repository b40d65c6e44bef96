"""Training throughput: our path against a plain transformers loop, same shapes and samples, in one run.

Run on a GPU box:  ``python -m internvl_tune.bench.train_throughput --shape internvl2-2b --steps 20``
(or ``internvl-tune bench train --shape ...``). Prints one table row per variant and writes JSON to ``--out``.

The plain loop is what a user writes with transformers alone: fp32 parameters + bf16 autocast, SDPA, batch 1,
frozen vision tower, full-vocabulary loss inside ``model(..., labels=...)``, ``torch.optim.AdamW``. Its LoRA form
(``plain+lora16+ckpt``) is what a user writes with transformers + peft: a bf16 base, peft LoRA on q/k/v/o/gate/up/down
(alpha 2r, dropout 0.05), gradient checkpointing, SDPA, batch 1.
Ours: bf16 compute with fp32 master weights (FSDP2 mixed precision), frozen ViT run without autograd, packed
rows of ``--packed_tokens`` with per-sample attention (flash varlen), loss on supervised positions only, fused
AdamW, no host sync inside a step, optional ``torch.compile`` of the ViT and LLM blocks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from internvl_tune.bench.common import materialize, measure_matmul_peak, param_counts, step_flops, synthetic_samples
from internvl_tune.bench.shapes import SHAPES, native_config
from internvl_tune.cli.flags import description


def _model(shape: str, attn: str, device: torch.device, dtype: torch.dtype):
    from transformers import InternVLForConditionalGeneration

    cfg = native_config(shape, attn)
    torch.manual_seed(0)
    with device:
        model = InternVLForConditionalGeneration(cfg).to(dtype)
    return model, cfg


LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def run_plain(shape: str, samples, device, warmup: int, lora_rank: int = 0, grad_checkpoint: bool = False) -> dict:
    """The plain transformers loop (see the module docstring); with ``lora_rank``: the plain transformers + peft loop
    (bf16 base, peft LoRA on q/k/v/o/gate/up/down, dropout 0.05, optional gradient checkpointing, SDPA, batch 1)."""
    model, cfg = _model(shape, "sdpa", device, torch.bfloat16 if lora_rank else torch.float32)
    model.model.vision_tower.requires_grad_(False)
    counts = param_counts(model)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.05,
                                                 target_modules=LORA_TARGETS))
    if grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batches = [materialize(s, cfg.image_token_id, cfg.text_config.vocab_size, i) for i, s in enumerate(samples)]
    pixel_dtype = torch.bfloat16 if lora_rank else torch.float32
    torch.cuda.reset_peak_memory_stats(device)
    tokens, start = 0, None
    for i, b in enumerate(batches):
        if i == warmup:
            torch.cuda.synchronize(device)
            start, tokens = time.perf_counter(), 0
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=b["input_ids"][None].to(device), labels=b["labels"][None].to(device),
                        pixel_values=b["pixel_values"].to(device, pixel_dtype))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += len(b["input_ids"])
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    timed = samples[warmup:]
    flops = step_flops(counts, cfg, timed)
    if lora_rank:  # a frozen LLM costs 4·N·T (forward + input gradients), not 6·N·T
        flops -= 2 * counts["llm"] * sum(s.tokens for s in timed)
    del model, opt
    name = "plain transformers loop" + (f" + peft LoRA r{lora_rank}" if lora_rank else "")
    name += " + grad ckpt" if grad_checkpoint else ""
    return {"variant": name, "tokens_per_s": tokens / elapsed, "tflops": flops / elapsed / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="internvl2-2b", choices=list(SHAPES), metavar="SHAPE",
                        help=f"architecture to build: {', '.join(SHAPES)} (default: internvl2-2b)")
    parser.add_argument("--samples", type=int, default=64, help="synthetic samples (1-7 tiles, 64-1024 text tokens)")
    parser.add_argument("--warmup", type=int, default=8, help="samples (plain) / steps (ours) not timed")
    parser.add_argument("--packed_tokens", type=int, default=8192, help="token budget of a packed row (ours)")
    parser.add_argument("--variants", default="plain,ours",
                        help="comma list of: plain[+lora<rank>][+ckpt] and ours[+compile][+ckpt[FRACTION|selective]]"
                             "[+lora<rank>][+profile] (e.g. plain+lora16+ckpt, ours+compile+ckpt0.5+lora16)")
    parser.add_argument("--steps", type=int, default=None, help="timed packed steps for ours (default: one epoch)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda")  # (set PYTORCH_CUDA_ALLOC_CONF before CUDA starts: see main() at the bottom)
    peak = measure_matmul_peak(device)
    samples = synthetic_samples(args.samples, seed=0)
    rows = []
    for variant in args.variants.split(","):
        torch._dynamo.reset()  # each variant compiles afresh, under its own activation memory budget
        torch.cuda.empty_cache()
        try:
            opts = variant.split("+")[1:]  # options joined by "+": compile, ckpt[...], lora<rank>, profile
            lora = next((int(o[4:]) for o in opts if o.startswith("lora")), 0)
            if variant.startswith("plain"):
                row = run_plain(args.shape, samples, device, args.warmup, lora, any(o.startswith("ckpt") for o in opts))
            else:
                from internvl_tune.bench.ours import run_ours

                row = run_ours(args.shape, samples, device, args.warmup, args.packed_tokens, compile="compile" in opts,
                               grad_checkpoint=next((o[4:] or "True" for o in opts if o.startswith("ckpt")), "False"),
                               lora_rank=lora, steps=args.steps,
                               profile="profile" in opts)
        except Exception as exc:  # one failing variant must not cost the others' numbers
            print(f"variant {variant} failed: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
            continue
        row.update(shape=args.shape, mfu=row["tflops"] / peak, matmul_peak_tflops=peak,
                   device=torch.cuda.get_device_name(device), torch=torch.__version__)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))
    base = next((r for r in rows if r["variant"].startswith("plain")), None)
    base = base or {"tokens_per_s": float("nan")}
    print(f"\n{'variant':<34} {'tokens/s':>10} {'x plain':>8} {'MFU':>6} {'peak GiB':>9} {'est GiB':>8}   ({args.shape}, "
          f"matmul peak {peak:.0f} TFLOP/s, {torch.cuda.get_device_name(device)})")
    for r in rows:
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"{r['variant']:<34} {r['tokens_per_s']:>10.0f} {ratio:>8.2f} {r['mfu']:>6.1%} {r['peak_gib']:>9.1f}"
              f" {r.get('estimate_gib', float('nan')):>8.1f}")
    return 0


if __name__ == "__main__":
    import os

    # packed rows vary in length every step; expandable segments stop the allocator from fragmenting
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    raise SystemExit(main())
