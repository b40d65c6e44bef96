"""``internvl-tune convert SRC DST --to original|native``: re-write a checkpoint in the other layout, bit-exactly."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  internvl-tune convert ./pretrained/InternVL2-8B ./pretrained/InternVL2-8B-hf --to native
  internvl-tune convert ./pretrained/InternVL2-8B-hf ./pretrained/InternVL2-8B-orig --to original

Tensors keep their dtype (bf16 stays bf16) and values; original -> native -> original gives identical tensors and
config.json. The native layout loads with transformers.AutoModelForImageTextToText; the original layout is what the
reference code, vLLM and lmdeploy read (the source's tokenizer and remote-code files are copied along)."""


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint directory (original or native layout)")
    parser.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--to", choices=("original", "native"), required=True, help="layout to write")
    parser.add_argument("--dtype", choices=("keep", "bfloat16", "float16", "float32"), default="keep",
                        help="cast the weights (default: keep each tensor's dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from internvl_tune.models.internvl_chat import load_pretrained

    dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
    chat = load_pretrained(args.src, dtype=dtype, device="cpu")
    out = chat.save_pretrained(args.dst, layout=args.to, overwrite=args.overwrite)
    print(f"wrote {args.to} layout ({chat.family}) to {out}")
    return 0
