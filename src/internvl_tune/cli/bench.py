"""``internvl-tune bench verify|train|eval|e2e|smoke|qlora|plot``: the benchmark scripts of ``internvl_tune.bench``
as one command."""

from __future__ import annotations

import argparse

SCRIPTS = {
    "verify": ("internvl_tune.bench.verify",
               "every GPU claim in one command under 9 minutes: matmul peak, compiled = eager, 8B LoRA and 1B vs the "
               "plain loops, e2e, QLoRA 76B, DPO / MPO, InternVL-14B full, the automatic checkpointing choice; "
               "verify.json + verify.md (CUDA; tiny shapes on the CPU)"),
    "train": ("internvl_tune.bench.train_throughput",
              "training tokens/s, MFU and peak memory: our path against a plain transformers loop (CUDA)"),
    "eval": ("internvl_tune.bench.eval_speed",
             "InternVL-14B retrieval embedding, head fine-tune and batched captioning speed (CUDA)"),
    "e2e": ("internvl_tune.bench.e2e",
            "internvl-tune train on real JPEG files against the benchmark harness, same shape (CUDA; "
            "its data loader alone anywhere: see `bench e2e --help`)"),
    "smoke": ("internvl_tune.bench.gpu_smoke",
              "the training CLIs with tiny checkpoints, torch.compile on and off: losses must agree"),
    "plot": ("internvl_tune.bench.plot", "redraw throughput.png from the bench_*.json files of a folder"),
    "grpo": ("internvl_tune.bench.grpo",
             "GRPO rollouts: our generation against transformers' generate, and a step's generation / update split "
             "(CUDA; its own tiny option runs it on the CPU)"),
    "qlora": ("internvl_tune.bench.qlora_check",
              "QLoRA (4-bit LLM + LoRA) steps on a random-weight shape: peak memory against the estimate (CUDA; "
              "the estimate alone anywhere)"),
}
NEEDS_CUDA = {"train", "eval"}  # (verify, e2e and qlora check their own modes)

EPILOG = """examples:
  internvl-tune bench verify --out verify/          (one GPU, < 9 minutes: verify.json, verify.md)
  internvl-tune bench verify --out /tmp/v --tiny     (the same parts, tiny shapes, CPU)
  internvl-tune bench train --shape internvl2-2b --variants plain,ours+compile --out bench_2b.json
  internvl-tune bench train --help        (every option of one script)
  internvl-tune bench eval --parts caption --out eval.json
  internvl-tune bench smoke --out /tmp/smoke
  internvl-tune bench plot docs/perf
  internvl-tune bench qlora --shape internvl2-76b --steps 6      (needs bitsandbytes)
  internvl-tune bench grpo --shape internvl2-2b --out bench_grpo.json

Results recorded so far, with the commands that produced them: docs/performance.md."""


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", choices=sorted(SCRIPTS),
                        help="; ".join(f"{k}: {v[1]}" for k, v in SCRIPTS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options of that script (see `bench SCRIPT --help`)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib

    import torch

    from internvl_tune.errors import UserError

    module, _ = SCRIPTS[args.script]
    if args.script in NEEDS_CUDA and "--help" not in args.args and "-h" not in args.args \
            and not torch.cuda.is_available():
        raise UserError(f"`bench {args.script}` measures GPU speed and needs a CUDA device; none is visible here "
                        f"(`bench smoke` runs on the CPU too)")
    return importlib.import_module(module).main(args.args)
