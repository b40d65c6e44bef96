"""Training throughput: our path against a plain transformers loop, same shapes and samples, timed in alternation.

Run on a GPU box:  ``python -m internvl_tune.bench.train_throughput --shape internvl2-2b`` (or ``internvl-tune bench
train --shape ...``). Prints one table row per variant and writes JSON to ``--out``.

The plain loop is what a user writes with transformers alone (``bench/plain.py``): fp32 parameters + bf16 autocast,
SDPA, batch 1, frozen vision tower, full-vocabulary loss inside ``model(..., labels=...)``, ``torch.optim.AdamW``.
Its LoRA form (``plain+lora16+ckpt``) is what a user writes with transformers + peft: a bf16 base, peft LoRA on
q/k/v/o/gate/up/down (alpha 2r, dropout 0.05), gradient checkpointing, SDPA, batch 1.
Ours (``bench/ours.py``): bf16 compute with fp32 master weights (FSDP2 mixed precision), frozen ViT run without
autograd, packed rows of ``--packed_tokens`` with per-sample attention (flash varlen), loss on supervised positions
only, fused AdamW, no host sync inside a step, optional ``torch.compile`` of the ViT and LLM blocks.

Honest ratios (``bench/compare.py``): the plain loop is built once and stays in memory; each of our variants is
built in turn, and after both have warmed up, ``--repeats`` timed rounds alternate (ours, plain, ours, plain, ...),
the plain loop running exactly the samples of ours' packs, batch 1. Every number is the median of the rounds, with
its min-max; "x plain" is the ratio of the medians, with the range the rounds allow. Peak memory is each loop's own
(the other loop's resident memory taken out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from internvl_tune.bench.common import measure_matmul_peak, synthetic_samples
from internvl_tune.bench.compare import MIN_REPEATS, LoopStats, alternate, ratio, schedule
from internvl_tune.bench.shapes import SHAPES
from internvl_tune.cli.flags import description
from internvl_tune.errors import UserError


def parse_variant(variant: str) -> dict:
    """``plain[+lora<rank>][+ckpt]`` or ``ours[+compile][+ckpt[FRACTION|selective]][+lora<rank>][+profile]``."""
    kind, *opts = variant.split("+")
    if kind not in ("plain", "ours"):
        raise UserError(f"--variants: {variant!r} must start with plain or ours")
    return {"plain": kind == "plain", "compile": "compile" in opts, "profile": "profile" in opts,
            "lora_rank": next((int(o[4:]) for o in opts if o.startswith("lora")), 0),
            "grad_checkpoint": next((o[4:] or "True" for o in opts if o.startswith("ckpt")), "False")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="internvl2-2b", choices=list(SHAPES), metavar="SHAPE",
                        help=f"architecture to build: {', '.join(SHAPES)} (default: internvl2-2b)")
    parser.add_argument("--samples", type=int, default=64, help="synthetic samples (1-7 tiles, 64-1024 text tokens)")
    parser.add_argument("--warmup", type=int, default=4,
                        help="untimed packed steps of each of our variants before timing (compilation); the plain "
                             "loop warms up on 2 samples")
    parser.add_argument("--steps", type=int, default=4,
                        help="packed steps of each timed round of ours; the plain loop's round runs the same samples")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS,
                        help=f"timed rounds, alternating the loops (at least {MIN_REPEATS})")
    parser.add_argument("--packed_tokens", type=int, default=8192, help="token budget of a packed row (ours)")
    parser.add_argument("--llm_layers", type=int, default=None,
                        help="run this many of the LLM's decoder layers (default: all); both loops stay in memory, "
                             "so a model too large for two copies on one GPU (InternVL3.5-30B-A3B, GPT-OSS-20B-A4B) is "
                             "cut in depth")
    parser.add_argument("--variants", default="plain,ours",
                        help="comma list of: plain[+lora<rank>][+ckpt] (at most one) and ours[+compile]"
                             "[+ckpt[FRACTION|selective]][+lora<rank>][+profile] (e.g. plain+lora16+ckpt,"
                             "ours+compile+ckpt0.5+lora16); +profile summarises one more step under the profiler")
    parser.add_argument("--out", default=None, help="write the results as JSON here (after every variant)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of the tiny shape")
    return parser


def main(argv: list[str] | None = None) -> int:
    from internvl_tune.bench.ours import build_ours, compiled_graphs, packs_of
    from internvl_tune.bench.plain import PlainLoop
    from internvl_tune.bench.profile import describe

    args = build_parser().parse_args(argv)
    variants = {v: parse_variant(v) for v in args.variants.split(",")}
    if args.repeats < MIN_REPEATS:
        raise UserError(f"--repeats {args.repeats}: a ratio needs at least {MIN_REPEATS} timed rounds of each loop")
    if sum(v["plain"] for v in variants.values()) > 1:
        raise UserError("--variants: one plain loop at most (it is the baseline every variant alternates with)")
    device = torch.device(args.device)  # (PYTORCH_CUDA_ALLOC_CONF is set before CUDA starts: main() at the bottom)
    cuda = device.type == "cuda"
    peak = measure_matmul_peak(device, n=8192 if cuda else 256)
    samples = synthetic_samples(args.samples, seed=0, **({} if cuda else {"tiles": (1, 2), "text": (16, 64)}))
    packs, waste = packs_of(samples, args.packed_tokens)
    warm, rounds = schedule(packs, args.warmup, args.steps, args.repeats)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    base = {"shape": args.shape, "llm_layers": args.llm_layers, "matmul_peak_tflops": peak, "device": name,
            "torch": torch.__version__}
    plain_spec = next((v for v in variants.values() if v["plain"]), None)
    plain = None
    if plain_spec is not None:
        plain = PlainLoop(args.shape, samples, device, plain_spec["lora_rank"], plain_spec["grad_checkpoint"] != "False",
                          args.llm_layers)
    rows, plain_repeats = [], []
    for name, spec in variants.items():
        if spec["plain"]:
            continue
        torch._dynamo.reset()  # each variant compiles afresh, under its own activation memory budget
        if cuda:
            torch.cuda.empty_cache()
        loop = None
        try:  # one failing variant must not cost the others' numbers
            loop = build_ours(args.shape, samples, device, args.packed_tokens, spec["compile"],
                              spec["grad_checkpoint"], spec["lora_rank"], args.llm_layers)
            stats = alternate([loop] + ([plain] if plain else []), warm, rounds)
            row = stats[loop.name].summary(peak) | base | {"estimate_gib": loop.estimate_gib, "padding_waste": waste}
            if spec["compile"]:
                row["compiled_graphs"] = compiled_graphs()
            if plain:
                plain_repeats += stats[plain.name].repeats
                row |= ratio(row, stats[plain.name].summary(peak))
            if spec["profile"]:
                row["profile"] = loop.profile(rounds[0][0])
                print(describe(row["profile"]), flush=True)
        except Exception as exc:
            print(f"variant {name} failed: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
            continue
        finally:
            del loop
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))
    if plain is not None and plain_repeats:
        rows.insert(0, LoopStats(plain.name, plain_repeats).summary(peak) | base)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))
    print_table(rows, args.shape, peak, name)
    return 0


def print_table(rows: list[dict], shape: str, peak: float, device: str) -> None:
    print(f"\n{'variant':<40} {'tokens/s (min-max)':>26} {'x plain (range)':>18} {'MFU':>6} {'peak GiB':>9} "
          f"{'est GiB':>8}   ({shape}, matmul peak {peak:.0f} TFLOP/s, {device}; medians of "
          f"{rows[0]['repeats'] if rows else 0} alternated rounds)")
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f})"
        x = f"{r['x_plain']:.2f} ({r['x_plain_min']:.2f}-{r['x_plain_max']:.2f})" if "x_plain" in r else ""
        print(f"{r['variant']:<40} {tps:>26} {x:>18} {r['mfu']:>6.1%} {r['peak_gib']:>9.1f}"
              f" {r.get('estimate_gib', float('nan')):>8.1f}")


if __name__ == "__main__":
    import os

    # packed rows vary in length every step; expandable segments stop the allocator from fragmenting
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    raise SystemExit(main())
