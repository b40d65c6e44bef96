"""``internvl-tune convert SRC DST --to original|native``: re-write a checkpoint or a LoRA adapter in the other layout."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  internvl-tune convert ./pretrained/InternVL2-8B ./pretrained/InternVL2-8B-hf --to native
  internvl-tune convert ./pretrained/InternVL2-8B-hf ./pretrained/InternVL2-8B-orig --to original
  internvl-tune convert work_dirs/my_lora_run/adapter work_dirs/adapter-orig --to original

Checkpoints: tensors keep their dtype (bf16 stays bf16) and values; original -> native -> original gives identical
tensors and config.json. The native layout loads with transformers.AutoModelForImageTextToText, and with
AutoProcessor where torchvision is installed (InternVLProcessor's video processor needs it); the original layout is
what the reference code, vLLM and lmdeploy read. The source's tokenizer, generation, processor and remote-code files
are copied along, nothing else (a training run's logs and checkpoints stay behind).

LoRA adapters (a directory with adapter_config.json): --to original keys the adapter by the original InternVL2
module names, for vLLM and peft on the reference model; where the original fuses q/k/v (InternViT qkv, InternLM2
wqkv) it holds the exact fused equivalent. --to native rewrites an adapter in the current format (older folders).

A training run's checkpoint-N of a full fine-tune converts like a checkpoint (its base model with the trained tensors
of that step); a LoRA run's checkpoint-N goes through merge-lora instead."""


def register(subparsers, name: str, help_text: str) -> None:
    from internvl_tune.cli.flags import add_bool_flag

    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint directory (original or native layout), LoRA adapter directory, or a "
                                    "training run's checkpoint-N directory")
    parser.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--to", choices=("original", "native"), required=True, help="layout to write")
    parser.add_argument("--dtype", choices=("keep", "bfloat16", "float16", "float32"), default="keep",
                        help="cast the weights of a checkpoint (default: keep each tensor's dtype)")
    parser.add_argument("--base", default=None,
                        help="adapters written before the current format only: their base checkpoint, which tells the "
                             "LLM's head layout (default: the one recorded in the adapter)")
    add_bool_flag(parser, "overwrite", False, "replace a non-empty DST")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from internvl_tune.errors import UserError
    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.lora import adapter_dir_of, has_lora
    from internvl_tune.models.internvl_chat.lora_convert import convert_adapter
    from internvl_tune.models.internvl_chat.training_checkpoint import is_training_checkpoint, load_checkpoint_model

    if is_training_checkpoint(args.src):
        chat = load_checkpoint_model(args.src)
        if has_lora(chat):
            raise UserError(f"{args.src} is a checkpoint of a LoRA run — merge it into its base model with "
                            f"`internvl-tune merge-lora {args.src} --out DIR --layout {args.to}`")
        if args.dtype == "keep":  # the base's dtype, as merge-lora keeps it
            from internvl_tune.models.internvl_chat.loading import iter_tensors

            chat.model.to(next(iter_tensors(chat.source_dir))[1].dtype)
        else:
            chat.model.to(getattr(torch, args.dtype))
        out = chat.save_pretrained(args.dst, layout=args.to, overwrite=args.overwrite)
        print(f"wrote {args.to} layout ({chat.family}) of {args.src} to {out}")
        return 0
    if not (Path(args.src) / "config.json").is_file() and adapter_dir_of(args.src) is not None:
        if args.dtype != "keep":
            raise UserError("--dtype applies to checkpoints; an adapter keeps the dtype it was trained in")
        out = convert_adapter(args.src, args.dst, args.to, base=args.base, overwrite=args.overwrite)
        print(f"wrote the adapter keyed by {args.to} module names to {out}")
        return 0
    dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
    chat = load_pretrained(args.src, dtype=dtype, device="cpu")
    out = chat.save_pretrained(args.dst, layout=args.to, overwrite=args.overwrite)
    print(f"wrote {args.to} layout ({chat.family}) to {out}")
    return 0
