"""``internvl-tune merge-lora ADAPTER_DIR --base BASE --out DIR``: fold a LoRA adapter into its base model."""

from __future__ import annotations

import argparse

EPILOG = """example:
  internvl-tune merge-lora work_dirs/my_lora_run/adapter --base ./pretrained/InternVL2-2B --out work_dirs/merged

The adapter's config names the base it was trained on; a base with other shapes is refused. The merged model is
written in the original layout (or --layout native)."""


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--base", required=True, help="the base checkpoint the adapter was trained on")
    parser.add_argument("--out", required=True, help="output directory for the merged model")
    parser.add_argument("--layout", choices=("original", "native"), default="original")
    parser.add_argument("--dtype", choices=("keep", "bfloat16", "float32"), default="keep",
                        help="dtype of the merged weights (default: the base's); the merge itself runs in float32")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.loading import iter_tensors
    from internvl_tune.models.internvl_chat.lora import load_adapter, merge_lora

    chat = load_pretrained(args.base, dtype=torch.float32)
    load_adapter(chat, args.adapter)
    merge_lora(chat)
    if args.dtype == "keep":
        _, first, _ = next(iter_tensors(chat.source_dir))
        target = first.dtype
    else:
        target = getattr(torch, args.dtype)
    chat.model.to(target)
    out = chat.save_pretrained(args.out, layout=args.layout)
    print(f"merged {args.adapter} into {args.base}: {out}")
    return 0
