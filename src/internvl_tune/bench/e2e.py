"""End to end: ``internvl-tune train`` on real JPEG files against the benchmark harness, same shape, one run.

The harness (``bench train``) feeds pre-built tensors; a user's run decodes JPEGs, tiles them and tokenizes in the
data-loader workers. This writes a random-weight InternVL2-1B-shaped checkpoint in the original layout (with the real
Qwen2 tokenizer) and a JSONL dataset of JPEGs whose tile counts and text lengths follow the harness's synthetic
samples, runs ``internvl-tune train`` on it (packed rows, compiled, frozen ViT, as ``ours+compile``), then the harness
on the same shape, and reports both throughputs and the share of step time the trainer waited for data.

Run on a GPU box: ``internvl-tune bench e2e --out /tmp/e2e --steps 40 --workers 8``.

``--loader_only`` runs no model (any machine, no GPU): it times the training run's data loader alone on the same
files and reports the tokens/s that ``--workers`` workers produce on this machine's CPUs, the rate a GPU step must
not outrun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from internvl_tune.bench.common import synthetic_samples
from internvl_tune.cli.flags import description
from internvl_tune.errors import UserError

WORDS = ("the a cat dog sits on table red blue green small large photo shows image of with near under and man "
         "woman car tree sky water boat street light window house book cup coffee plate food").split()


def write_checkpoint(shape: str, out: Path) -> Path:
    """A random-weight checkpoint of ``shape`` in the original InternVL2 layout, with the real Qwen2 tokenizer."""
    from transformers import InternVLForConditionalGeneration

    from internvl_tune.bench.shapes import native_config
    from internvl_tune.models.internvl_chat.config import original_from_native
    from internvl_tune.models.internvl_chat.saving import write_original_checkpoint
    from internvl_tune.testing.tokenizers import write_qwen2_tokenizer

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = native_config(shape)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(cfg).to(torch.bfloat16)
    original = original_from_native(cfg.to_dict())
    original.update(template="Hermes-2", dynamic_image_size=True, use_thumbnail=False, max_dynamic_patch=12)
    write_qwen2_tokenizer(out)
    write_original_checkpoint(out, {k: v.contiguous() for k, v in model.state_dict().items()}, original)
    return out


def write_dataset(out: Path, n: int, seed: int = 0) -> Path:
    """JPEGs and a JSONL over them: sample i has the harness's tile count (an image t tiles wide) and text length."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, sample in enumerate(synthetic_samples(n, seed=seed)):
        name = f"img{i:04d}.jpg"
        if not (out / name).is_file():  # smooth colour ramps with noise: JPEG sizes like photos'
            w, h = 448 * sample.tiles, 448
            ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1.0, 3)
            pixels = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(out / name, quality=90)
        words = [str(w) for w in rng.choice(WORDS, size=sample.text)]
        half = len(words) // 2
        lines.append({"id": i, "image": name, "width": 448 * sample.tiles, "height": 448, "conversations": [
            {"from": "human", "value": "<image>\n" + " ".join(words[:half])},
            {"from": "gpt", "value": " ".join(words[half:])}]})
    (out / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    meta = {"e2e": {"root": str(out), "annotation": str(out / "data.jsonl"), "data_augment": False, "repeat_time": 1,
                    "length": n}}
    (out / "meta.json").write_text(json.dumps(meta))
    return out / "meta.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="working directory: checkpoint, images, the training run")
    parser.add_argument("--shape", default="internvl2-1b", help="model shape (the real tokenizer exists for 1B)")
    parser.add_argument("--samples", type=int, default=256, help="JPEG samples in the dataset")
    parser.add_argument("--steps", type=int, default=40,
                        help="optimizer steps of the training run (--loader_only: packed rows timed)")
    parser.add_argument("--warmup", type=int, default=10, help="logged steps left out of the average (compilation)")
    parser.add_argument("--workers", type=int, default=8, help="data-loader workers of the training run")
    parser.add_argument("--packed_tokens", type=int, default=8192, help="token budget of a packed row")
    parser.add_argument("--loader_only", action="store_true",
                        help="time the data loader alone (no model, no GPU): tokens/s produced by --workers workers")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser


def train_argv(args: argparse.Namespace, checkpoint: Path, meta: Path, run: Path) -> list[str]:
    """The ``internvl-tune train`` command of the end-to-end run (packed rows, compiled, frozen ViT)."""
    return ["train", "--model_name_or_path", str(checkpoint), "--meta_path", str(meta), "--output_dir", str(run),
            "--overwrite_output_dir", "True", "--bf16", "True", "--freeze_backbone", "True",
            "--use_packed_ds", "True", "--max_packed_tokens", str(args.packed_tokens), "--max_seq_length", "16384",
            "--num_images_expected", "64", "--max_steps", str(args.steps), "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--grad_checkpoint", "False",
            "--torch_compile", "True", "--dataloader_num_workers", str(args.workers), "--learning_rate", "1e-5"]


def loader_rate(argv: list[str], workers: int, batches: int) -> dict:
    """Tokens/s and samples/s that the data loader of the training command ``argv`` produces with ``workers``.

    The recipe and loader are the trainer's (``ChatRecipe.build_data``, ``train.runtime.make_loader``), configured
    by the same flags; the model is built on the meta device (only its tokenizer and config are read). The first
    packed row is left out of the timing (worker start-up).
    """
    import time

    from internvl_tune.cli import build_parser
    from internvl_tune.cli.train import recipe as chat_recipe
    from internvl_tune.cli.train import sections
    from internvl_tune.train.config import load_config
    from internvl_tune.train.runtime import make_loader

    recipe = chat_recipe(load_config(build_parser(argv).parse_args(argv), sections()))
    recipe.build_module(torch.bfloat16, weights=False)
    train, _, collate, sampler = recipe.build_data(0, 0, 1, 1, 1)
    micro = [mb for _, micros in sampler.epoch_steps(0, 0) for mb in micros][: batches + 1]
    loader = iter(make_loader(train, micro, collate, workers))
    next(loader)
    start, tokens, samples = time.perf_counter(), 0, 0
    for loaded in loader:
        batch = loaded.batch
        tokens += batch.num_tokens
        samples += int(batch.cu_seq_lens.numel()) - 1
    seconds = time.perf_counter() - start
    return {"workers": workers, "packed_rows": len(micro) - 1, "loader_tokens_per_s": tokens / seconds,
            "loader_samples_per_s": samples / seconds}


def main(argv: list[str] | None = None) -> int:
    from internvl_tune.bench.ours import run_ours
    from internvl_tune.cli import main as cli
    from internvl_tune.train.metrics import read_jsonl

    args = build_parser().parse_args(argv)
    if not args.loader_only and not torch.cuda.is_available():
        raise UserError("`bench e2e` measures GPU speed and needs a CUDA device; none is visible here (--loader_only "
                        "times the data loader alone, on any machine)")
    out = Path(args.out)
    ckpt = write_checkpoint(args.shape, out / "checkpoint")
    meta = write_dataset(out / "data", args.samples)
    run = out / "run"
    argv = train_argv(args, ckpt, meta, run)
    if args.loader_only:
        result = {"shape": args.shape, **loader_rate(argv, args.workers, args.steps), "cpus": os.cpu_count()}
        print(json.dumps(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\ndata loader alone: {result['loader_tokens_per_s']:.0f} tokens/s, "
              f"{result['loader_samples_per_s']:.1f} samples/s with {args.workers} workers ({os.cpu_count()} CPUs)")
        return 0
    code = cli(argv)
    if code != 0:
        return code
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "tokens_per_s" in r][args.warmup:]
    e2e = statistics.median(r["tokens_per_s"] for r in rows)
    wait = statistics.mean(r["data_wait"] for r in rows)
    torch.cuda.empty_cache()
    harness = run_ours(args.shape, synthetic_samples(args.samples, seed=0), torch.device("cuda"), warmup=args.warmup,
                       packed_tokens=args.packed_tokens, compile=True, steps=args.steps - args.warmup)
    result = {"shape": args.shape, "e2e_tokens_per_s": e2e, "harness_tokens_per_s": harness["tokens_per_s"],
              "ratio": e2e / harness["tokens_per_s"], "data_wait_share": wait, "workers": args.workers,
              "last_step_tokens_per_s": rows[-1]["tokens_per_s"] if rows else None,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\ninternvl-tune train on JPEGs: {e2e:.0f} tokens/s (median of {len(rows)} logged steps; last step "
          f"{result['last_step_tokens_per_s']:.0f}), harness: {harness['tokens_per_s']:.0f} tokens/s, ratio "
          f"{result['ratio']:.2f}; the trainer waited for data {wait:.1%} of the step time ({args.workers} workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
