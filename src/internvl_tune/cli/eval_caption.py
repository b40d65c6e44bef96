"""``internvl-tune eval caption``: zero-shot captioning on COCO Karpathy test, Flickr30K and NoCaps.

Runs as one process or under ``torchrun`` (``evaluate.sh`` launches it that way); each rank captions a contiguous
slice of every test set and rank 0 scores. The model kind is read from the checkpoint's config.json and sets the
reference defaults: InternVL-G gets ``English caption:`` with beam search 5, InternVL2 chat models the one-sentence
question with greedy decoding.
"""

from __future__ import annotations

import argparse

import torch

from internvl_tune.cli.flags import add_bool_flag, add_dtype_flag, add_flag, torch_dtype
from internvl_tune.errors import UserError


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flag(p, "--model_name_or_path", "--model", "--checkpoint", required=True,
             help="checkpoint folder: InternVL-14B (InternVL-G) or an InternVL2 chat model")
    add_flag(p, "--datasets", default="coco,flickr30k,nocaps", help="comma-separated: coco, flickr30k, nocaps")
    add_flag(p, "--data_root", "--data-root", default="data",
             help="folder holding coco/, flickr30k/ and nocaps/ (see `internvl-tune data prepare`)")
    add_flag(p, "--output_dir", "--out_dir", "--out-dir", default="results", help="where captions and scores go")
    add_flag(p, "--prompt", default=None,
             help="InternVL-G: 'English caption:'; chat: 'Provide a one-sentence caption for the provided image.'")
    add_flag(p, "--num_beams", "--num-beams", type=int, default=None,
             help="InternVL-G: 5; chat: 1 (forced to 1 for models over 20B parameters or with --dynamic_image_size)")
    add_flag(p, "--max_new_tokens", "--max-new-tokens", type=int, default=30,
             help="most tokens generated per caption")
    add_flag(p, "--min_new_tokens", "--min-new-tokens", type=int, default=8,
             help="fewest tokens generated per caption (the end token is held back until then)")
    add_flag(p, "--temperature", type=float, default=0.0, help="chat models: sample when > 0")
    add_bool_flag(p, "dynamic_image_size", False,
                  "chat models: dynamic-resolution tiling (up to --max_dynamic_patch tiles per image)",
                  aliases=("--dynamic",))
    add_flag(p, "--max_dynamic_patch", "--max_num", "--max-num", type=int, default=6, help="chat models: most tiles")
    add_flag(p, "--batch_size", "--batch-size", type=int, default=1,
             help="images per generate call (the reference uses 1; larger batches give the same captions)")
    add_flag(p, "--dataloader_num_workers", "--num_workers", "--num-workers", dest="num_workers", type=int, default=2,
             help="threads decoding images ahead of the model")
    add_dtype_flag(p, "auto", "auto: fp16 (InternVL-G) / bf16 (chat) on CUDA as the reference, fp32 on CPU",
                   special=("auto",))
    add_flag(p, "--device", choices=["auto", "cuda", "cpu"], default="auto",
             help="auto: the process's CUDA device when one is visible (one per rank under torchrun), else the CPU")
    add_flag(p, "--limit", type=int, default=None, help="caption only the first N images of each set (smoke test)")
    add_flag(p, "--seed", type=int, default=0, help="torch seed, for sampling with --temperature > 0")
    p.set_defaults(func=run)


def run(args) -> int:
    from internvl_tune import dist
    from internvl_tune.eval.caption.captioners import DEFAULTS, detect_model_kind, load_captioner
    from internvl_tune.eval.caption.datasets import parse_dataset_names
    from internvl_tune.eval.caption.metrics import require_java
    from internvl_tune.eval.caption.run import CaptionEvalConfig, evaluate_captions

    datasets = parse_dataset_names(args.datasets)
    kind = detect_model_kind(args.model_name_or_path)
    require_java()  # before loading a 14B model, not after generating for an hour
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    info = dist.init_distributed(None if args.device == "auto" else args.device)
    try:
        defaults = DEFAULTS[kind]
        dtype = torch_dtype(args.dtype) or (defaults.dtype if info.device.type == "cuda" else torch.float32)
        torch.manual_seed(args.seed)
        captioner, generation = load_captioner(
            args.model_name_or_path, kind, device=info.device, dtype=dtype, prompt=args.prompt or defaults.prompt,
            num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
            temperature=args.temperature, dynamic=args.dynamic_image_size, max_num=args.max_dynamic_patch,
            log=print if info.is_main else None,
        )
        cfg = CaptionEvalConfig(
            datasets=datasets, data_root=args.data_root, out_dir=args.output_dir, prompt=args.prompt or defaults.prompt,
            checkpoint=args.model_name_or_path, line_style=kind, batch_size=args.batch_size,
            num_workers=args.num_workers,
            limit=args.limit, generation={**generation, "dtype": str(dtype).removeprefix("torch."), "kind": kind},
        )
        if info.is_main:
            print(f"caption eval: {kind} on {', '.join(datasets)}, {info.world_size} process(es), {generation}")
        results = evaluate_captions(captioner, cfg, rank=info.rank, world_size=info.world_size,
                                    gather=dist.all_gather_object_ordered)
        if info.is_main and results:
            from pathlib import Path

            from internvl_tune.eval.caption.datasets import get_benchmark, load_images
            from internvl_tune.report import write_caption_report

            images = {name: {i.image_id: i.path for i in load_images(get_benchmark(name), args.data_root)}
                      for name in datasets}
            report = write_caption_report(Path(args.output_dir) / "report.html", args.model_name_or_path, results,
                                          images)

            print(f"report: {report}")

        dist.barrier()  # ranks > 0 wait for rank 0's scoring so torchrun reports one outcome
    finally:
        dist.shutdown()
    return 0
