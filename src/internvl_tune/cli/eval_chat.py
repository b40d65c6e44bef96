"""``internvl-tune eval chat``: did the fine-tune learn the task? Generate answers for held-out samples and score them.

    internvl-tune eval chat --model_name_or_path work_dirs/my_run --meta_path val.json
    internvl-tune eval chat --model_name_or_path work_dirs/my_run --meta_path val.json \\
        --compare ./pretrained/InternVL2-1B
    torchrun --nproc_per_node 8 -m internvl_tune.cli eval chat --model_name_or_path work_dirs/my_run \\
        --datasets chartqa_test_human

Every sample of the meta JSON (all four kinds) is asked up to its last ``gpt`` turn; the model's answer is compared
with that turn's text: exact match, relaxed accuracy (numbers within 5 %), ANLS, multiple-choice letter accuracy, and
BLEU-4 / ROUGE-L / CIDEr (pycocoevalcap, Java), per dataset and overall. ``--compare BASE`` answers the same
prompts with a second model (e.g. the base checkpoint) and prints both side by side. Writes ``predictions.jsonl``,
``scores.json`` and ``report.html`` (answers beside their images) into ``--output_dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc

import torch

from internvl_tune.cli.flags import add_bool_flag, add_dtype_flag, add_flag, description, torch_dtype
from internvl_tune.errors import UserError

# data settings that only training uses
TRAINING_ONLY = {"meta_path", "eval_meta_path", "use_packed_ds", "max_packed_tokens", "num_images_expected",
                 "loss_reduction", "group_by_length"}


def register(subparsers, name: str, help_text: str) -> None:
    from internvl_tune.data.config import DataConfig
    from internvl_tune.eval.chat.datasets import BENCHMARKS
    from internvl_tune.options import add_dataclass_flags

    p = subparsers.add_parser(name, help=help_text, description=description(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(p, "--model_name_or_path", "--model", "--checkpoint", required=True,
             help="a checkpoint, a training run's output directory, its adapter/ or one of its checkpoint-N/ "
                  "(as `internvl-tune chat` takes)")
    add_flag(p, "--meta_path", default=None, help="meta JSON of your held-out data (the format training reads)")
    add_flag(p, "--datasets", default=None, help=f"comma-separated named benchmarks: {', '.join(BENCHMARKS)}")
    add_flag(p, "--data_root", default="data", help="folder holding the benchmarks' files (for --datasets)")
    add_flag(p, "--compare", default=None, metavar="BASE",
             help="a second model (e.g. the base checkpoint) answering the same prompts, shown side by side")
    add_flag(p, "--base", default=None, help="base checkpoint of a LoRA adapter (default: the one it records)")
    add_flag(p, "--output_dir", "--out_dir", "--out-dir", default="results/eval_chat",
             help="where predictions.jsonl, scores.json and report.html go (default: results/eval_chat)")
    add_flag(p, "--batch_size", type=int, default=8, help="prompts per generate call (default: 8)")
    add_flag(p, "--max_new_tokens", type=int, default=None,
             help="most tokens per answer (default: a benchmark's own, 128 for --meta_path)")
    add_flag(p, "--temperature", type=float, default=0.0, help="> 0 samples; 0 is greedy (default: 0)")
    add_flag(p, "--top_p", type=float, default=1.0, help="nucleus sampling, with --temperature > 0 (default: 1)")
    add_flag(p, "--num_beams", type=int, default=1, help="beam search width (default: 1)")
    add_flag(p, "--limit", type=int, default=None, help="answer only the first N samples of each dataset")
    add_flag(p, "--dataloader_num_workers", "--num_workers", dest="num_workers", type=int, default=2,
             help="data-loader processes preparing prompts (default: 2)")
    add_bool_flag(p, "text_metrics", True, "BLEU-4 / ROUGE-L / CIDEr (pycocoevalcap; needs Java) (default: True)")
    add_dtype_flag(p, "auto", "auto: bf16 on CUDA, fp32 on CPU (default: auto)", special=("auto",))
    add_flag(p, "--device", choices=["auto", "cuda", "cpu"], default="auto",
             help="auto: the process's CUDA device when one is visible (one per rank under torchrun), else the CPU")
    add_flag(p, "--seed", type=int, default=0, help="torch seed, for sampling (default: 0)")
    group = p.add_argument_group("data settings (as for training; the checkpoint's when not given)")
    add_dataclass_flags(group, DataConfig, skip=TRAINING_ONLY)
    p.set_defaults(func=run)


def _specs(args):
    """``(dataset specs, instructions, max_new_tokens)`` of ``--meta_path`` and ``--datasets``."""
    from internvl_tune.data.meta import read_meta
    from internvl_tune.eval.chat.datasets import get_benchmark, parse_dataset_names

    names = parse_dataset_names(args.datasets)
    if not args.meta_path and not names:
        raise UserError("nothing to evaluate: pass --meta_path VAL.json (your held-out data) and/or --datasets NAME")
    specs = read_meta(args.meta_path) if args.meta_path else []
    benchmarks = [get_benchmark(n) for n in names]
    specs += [b.spec(args.data_root) for b in benchmarks]
    seen = [s.name for s in specs]
    if len(set(seen)) != len(seen):
        raise UserError(f"dataset names repeat: {seen}; give each dataset of the meta JSON its own name")
    longest = max([b.max_new_tokens for b in benchmarks] + ([128] if args.meta_path else []))
    return specs, {b.name: b.instruction for b in benchmarks}, args.max_new_tokens or longest


def _answer(path: str, args, specs, instructions, settings, info, dtype, label: str):
    """Load ``path``, answer every sample on this rank's shard, free the model; rows on every rank."""
    from internvl_tune import dist
    from internvl_tune.cli.chat import load_model
    from internvl_tune.data.config import DataConfig
    from internvl_tune.eval.chat.run import generate_answers, pick_samples
    from internvl_tune.eval.chat.samples import GenerationDataset
    from internvl_tune.models.internvl_chat.config import data_defaults

    chat = load_model(path, args.base if label == "model" else None, dtype=dtype, device=info.device)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)
              if f.name not in TRAINING_ONLY and hasattr(args, f.name)}
    data = DataConfig(**values).resolve(data_defaults(chat.original_config), path)
    dataset = GenerationDataset(specs, chat.tokenizer, data, seed=args.seed, instructions=instructions)
    if info.is_main:
        print(f"{label}: {path} ({chat.family}, template {data.conv_style}), {len(dataset)} samples")
    torch.manual_seed(args.seed)
    rows = generate_answers(chat, dataset, pick_samples(dataset, args.limit), settings, batch_size=args.batch_size,
                            num_workers=args.num_workers, rank=info.rank, world_size=info.world_size,
                            gather=dist.all_gather_object_ordered, show_progress=info.is_main,
                            description=f"{label} answers")
    del chat
    gc.collect()
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(args) -> int:
    from internvl_tune import dist
    from internvl_tune.eval.caption.metrics import require_java
    from internvl_tune.eval.chat.run import GenerationSettings, score_rows, summary_table, write_results

    specs, instructions, max_new_tokens = _specs(args)
    if args.text_metrics:
        require_java()  # before loading any model, not after generating for an hour
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    info = dist.init_distributed(None if args.device == "auto" else args.device)
    try:
        dtype = torch_dtype(args.dtype) or (torch.bfloat16 if info.device.type == "cuda" else torch.float32)
        settings = GenerationSettings(max_new_tokens, args.temperature, args.top_p, args.num_beams)
        models = {"model": args.model_name_or_path, **({"base": args.compare} if args.compare else {})}
        results = {}
        for label, path in models.items():
            rows = _answer(path, args, specs, instructions, settings, info, dtype, label)
            if info.is_main:
                results[label] = rows, score_rows(rows, args.text_metrics)
        if info.is_main:
            record = {"model": args.model_name_or_path, "base": args.compare,
                      "generation": dataclasses.asdict(settings),

                      "dtype": str(dtype).removeprefix("torch."), "world_size": info.world_size, "limit": args.limit,
                      "datasets": [s.name for s in specs]}
            predictions, scores = write_results(args.output_dir, results, record)
            print(summary_table({label: summary for label, (_, summary) in results.items()}))
            from internvl_tune.report import write_eval_chat_report

            page = write_eval_chat_report(args.output_dir)

            print(f"predictions: {predictions}\nscores: {scores}\nreport: {page}")
        dist.barrier()
    finally:
        dist.shutdown()
    return 0
