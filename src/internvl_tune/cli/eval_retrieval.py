"""``internvl-tune eval retrieval``: zero-shot image-text retrieval recall@k with clip_benchmark's flags and JSON.

    internvl-tune eval retrieval --model_type internvl --language en --task zeroshot_retrieval \\
        --dataset flickr30k --dataset_root ./data/flickr30k --model internvl_c_retrieval_hf \\
        --pretrained ./pretrained/InternVL-14B-224px --output result.json

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
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """clip_benchmark's ``eval`` flags that apply to InternVL retrieval, plus --device/--dtype/--datasets_file."""
    p.add_argument("--model_type", default="internvl", choices=["internvl"],
                   help="clip_benchmark's model family; only internvl is provided")
    p.add_argument("--model", default="internvl_c_retrieval_hf", choices=sorted(MODELS),
                   help="InternVL-C (contrastive) or InternVL-G (queries + backbone ensemble) embeddings")
    p.add_argument("--pretrained", required=True, help="InternVL-14B checkpoint folder (HF layout)")
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
    p.add_argument("--output", default="result.json",
                   help="metrics JSON; may contain {dataset} {model} {pretrained} {task} {language}")
    p.add_argument("--recall_k", nargs="+", type=int, default=[1, 5, 10],
                   help="the k of each image and text retrieval recall@k reported")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward (with all their captions)")
    p.add_argument("--num_workers", type=int, default=4, help="accepted for compatibility; images load in-process")
    p.add_argument("--no_amp", dest="amp", action="store_false",
                   help="no autocast on CUDA (without this flag: amp=%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="torch seed set before evaluating (clip_benchmark's flag)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA when a device is visible (one per rank under torchrun), else the CPU")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: fp16 on CUDA (as the reference loader), fp32 on CPU")
    p.add_argument("--quiet", dest="verbose", action="store_false",
                   help="print only errors, not the progress and result lines (without this flag: "
                        "verbose=%(default)s)")


def _gather_fn(world_size: int):
    if world_size == 1:
        return lambda x: x
    from internvl_tune.dist import all_gather_object_ordered

    def gather(x: torch.Tensor) -> torch.Tensor:
        parts = all_gather_object_ordered([x.cpu()])
        return torch.cat(parts).to(x.device)

    return gather


def run(args) -> int:
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
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)

    registry = load_dataset_registry(args.datasets_file) if args.datasets_file else {}
    root = args.dataset_root.format(dataset=dataset_name, dataset_cleaned=dataset_name.replace("/", "-"))
    dataset = resolve_dataset(dataset_name, root, args.split, language, args.annotation_file, registry)
    mode = MODELS[args.model]
    say = print if args.verbose and rank == 0 else (lambda *_a, **_k: None)
    say(f"Running 'zeroshot_retrieval' on '{dataset_name}' with the model '{args.pretrained}' ({mode}) on language "
        f"'{language}': {len(dataset.image_paths)} images, {dataset.num_texts} captions, {world_size} process(es)")

    model = load_internvl_cg(args.pretrained, dtype=dtype, device=device)
    tokenizer = load_tokenizer(args.pretrained, add_eos_token=True)
    start = time.time()
    metrics = evaluate_retrieval(
        model, dataset, lambda texts: tokenize_retrieval(tokenizer, texts)[0], mode, model.config.image_size,
        list(args.recall_k), batch_size=args.batch_size, device=device, amp=args.amp, rank=rank,
        world_size=world_size, gather_fn=_gather_fn(world_size),
    )
    say(f"done in {time.time() - start:.1f}s: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if rank == 0:
        output = args.output.format(model=args.model, pretrained=Path(args.pretrained).name, task=args.task,
                                    dataset=dataset_name.replace("/", "_"), language=language)
        dump = {"dataset": dataset_name, "model": args.model, "pretrained": args.pretrained, "task": args.task,
                "metrics": metrics, "language": language}
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(dump) + "\n")
        say(f"Dump results to: {output}")
        from internvl_tune.report import write_retrieval_report

        say(f"report: {write_retrieval_report(Path(output).with_suffix('.html'), dump, dataset)}")
    if distributed:
        from internvl_tune.dist import shutdown

        shutdown()
    return 0
