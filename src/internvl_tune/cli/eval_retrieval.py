"""``internvl-tune eval retrieval``: zero-shot image-text retrieval recall@k with clip_benchmark's flags and JSON.

    internvl-tune eval retrieval --model_type internvl --language en --task zeroshot_retrieval \\
        --dataset flickr30k --dataset_root ./data/flickr30k --model internvl_c_retrieval_hf \\
        --model_name_or_path ./pretrained/InternVL-14B-224px --output_file result.json

clip_benchmark's own spellings (``--pretrained``, ``--output``, ``--no_amp``, ``--quiet``) are hidden aliases, so the
InternVL README's ``python3 clip_benchmark/cli.py eval ... --pretrained DIR --output result.json`` runs unchanged.

Datasets (one table, ``eval/retrieval.BENCHMARKS``): ``flickr30k`` (``<root>/flickr30k_<split>_karpathy.txt``, or
``flickr30k_cn_<split>.txt`` with ``--language cn``; images in ``<root>/Images``), ``coco`` / ``mscoco_captions``
(``<root>/annotations/coco_karpathy_<split>.json`` or clip_benchmark's ``<root>/coco_<split>_karpathy.json``), or a
custom name with ``flickr_format`` / ``coco_format`` registered in ``--datasets_file``. Runs as one process or under torchrun (each
rank embeds a shard of the images). The JSON written is clip_benchmark's:
``{"dataset", "model", "pretrained", "task", "metrics": {"image_retrieval_recall@k", "text_retrieval_recall@k", ...},
"language"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from internvl_tune.errors import UserError

MODELS = {"internvl_c_retrieval_hf": "InternVL-C", "internvl_g_retrieval_hf": "InternVL-G"}


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """clip_benchmark's ``eval`` flags that apply to InternVL retrieval, plus --device/--dtype/--datasets_file; where
    clip_benchmark's spelling differs from the other commands' (``--pretrained``, ``--output``, ``--no_amp``,
    ``--quiet``), it is a hidden alias of theirs."""
    from internvl_tune.cli.flags import add_bool_flag, add_dtype_flag, add_flag

    p.add_argument("--model_type", default="internvl", choices=["internvl"],
                   help="clip_benchmark's model family; only internvl is provided")
    p.add_argument("--model", default="internvl_c_retrieval_hf", choices=sorted(MODELS),
                   help="clip_benchmark's model name: InternVL-C (contrastive) or InternVL-G (queries + backbone "
                        "ensemble) embeddings; the checkpoint is --model_name_or_path")
    add_flag(p, "--model_name_or_path", "--pretrained", required=True,
             help="InternVL-14B checkpoint folder (HF layout; clip_benchmark's --pretrained)")
    p.add_argument("--task", default="zeroshot_retrieval", help="only zeroshot_retrieval is supported")
    p.add_argument("--dataset", nargs="+", default=["flickr30k"],
                   help="flickr30k, coco (alias mscoco_captions), or a custom *_flickr_format / *_coco_format name")
    p.add_argument("--dataset_root", default="root", help="dataset folder (may contain {dataset})")
    p.add_argument("--split", default="test",
                   help="which annotation file: test, val or train (flickr30k_<split>_karpathy.txt, "
                        "coco_karpathy_<split>.json ...)")
    p.add_argument("--annotation_file", default="", help="override the annotation file of the dataset")
    p.add_argument("--datasets_file", default=None,
                   help="JSON/YAML {name: {root, annotation}} registering custom datasets")
    p.add_argument("--language", nargs="+", default=["en"], help="en or cn (Flickr30K-CN / COCO-CN)")
    add_flag(p, "--output_file", "--output", default="result.json",
             help="metrics JSON; may contain {dataset} {model} {pretrained} {task} {language}")
    p.add_argument("--recall_k", nargs="+", type=int, default=[1, 5, 10],
                   help="the k of each image and text retrieval recall@k reported")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward (with all their captions)")
    add_flag(p, "--dataloader_num_workers", "--num_workers", dest="num_workers", type=int, default=4,
             help="accepted for compatibility; images load in-process")
    add_bool_flag(p, "amp", True, "autocast on CUDA (clip_benchmark's --no_amp is --amp False)",
                  negations=("--no_amp",))
    p.add_argument("--seed", type=int, default=0, help="torch seed set before evaluating (clip_benchmark's flag)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA when a device is visible (one per rank under torchrun), else the CPU")
    add_dtype_flag(p, "auto", "auto: fp16 on CUDA (as the reference loader), fp32 on CPU", special=("auto",))
    add_bool_flag(p, "verbose", True, "print the progress and result lines, not only errors (--quiet is --verbose "
                  "False)", negations=("--quiet",))


def _gather_fn(world_size: int):
    if world_size == 1:
        return lambda x: x
    from internvl_tune.dist import all_gather_object_ordered

    def gather(x: torch.Tensor) -> torch.Tensor:
        parts = all_gather_object_ordered([x.cpu()])
        return torch.cat(parts).to(x.device)

    return gather


def run(args) -> int:
    from internvl_tune.cli.flags import torch_dtype
    from internvl_tune.data.retrieval import load_dataset_registry, tokenize_retrieval
    from internvl_tune.eval.retrieval import evaluate_retrieval, resolve_dataset
    from internvl_tune.models.internvl_cg.loading import load_internvl_cg
    from internvl_tune.models.internvl_cg.tokenizer import load_tokenizer

    if args.task != "zeroshot_retrieval":
        raise UserError(f"--task {args.task} is not supported by InternVL retrieval evaluation; use zeroshot_retrieval")
    if len(args.dataset) != 1 or len(args.language) != 1:
        raise UserError("give one --dataset and one --language per run")
    dataset_name, language = args.dataset[0], args.language[0]
    if language not in ("en", "cn"):
        raise UserError(f"--language {language}: use en or cn")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible")
    device_kind = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world_size, device = 0, 1, torch.device(device_kind)
    if distributed:
        from internvl_tune.dist import init_distributed

        info = init_distributed(device=device_kind)
        rank, world_size, device = info.rank, info.world_size, info.device
    dtype = torch_dtype(args.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)

    registry = load_dataset_registry(args.datasets_file) if args.datasets_file else {}
    root = args.dataset_root.format(dataset=dataset_name, dataset_cleaned=dataset_name.replace("/", "-"))
    dataset = resolve_dataset(dataset_name, root, args.split, language, args.annotation_file, registry)
    mode = MODELS[args.model]
    say = print if args.verbose and rank == 0 else (lambda *_a, **_k: None)
    say(f"Running 'zeroshot_retrieval' on '{dataset_name}' with the model '{args.model_name_or_path}' ({mode}) on "
        f"language '{language}': {len(dataset.image_paths)} images, {dataset.num_texts} captions, "
        f"{world_size} process(es)")


    model = load_internvl_cg(args.model_name_or_path, dtype=dtype, device=device)
    tokenizer = load_tokenizer(args.model_name_or_path, add_eos_token=True)
    start = time.time()
    metrics = evaluate_retrieval(
        model, dataset, lambda texts: tokenize_retrieval(tokenizer, texts)[0], mode, model.config.image_size,
        list(args.recall_k), batch_size=args.batch_size, device=device, amp=args.amp, rank=rank,
        world_size=world_size, gather_fn=_gather_fn(world_size),
    )
    say(f"done in {time.time() - start:.1f}s: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if rank == 0:
        output = args.output_file.format(model=args.model, pretrained=Path(args.model_name_or_path).name,
                                         task=args.task, dataset=dataset_name.replace("/", "_"), language=language)
        dump = {"dataset": dataset_name, "model": args.model, "pretrained": args.model_name_or_path,
                "task": args.task, "metrics": metrics, "language": language}

        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(dump) + "\n")
        say(f"Dump results to: {output}")
        from internvl_tune.report import write_retrieval_report

        say(f"report: {write_retrieval_report(Path(output).with_suffix('.html'), dump, dataset)}")
    if distributed:
        from internvl_tune.dist import shutdown

        shutdown()
    return 0
