"""``internvl-tune convert SRC DST --to original|native``: re-write a checkpoint or a LoRA adapter in the other layout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  internvl-tune convert ./pretrained/InternVL2-8B ./pretrained/InternVL2-8B-hf --to native
  internvl-tune convert ./pretrained/InternVL2-8B-hf ./pretrained/InternVL2-8B-orig --to original
  internvl-tune convert work_dirs/my_lora_run/adapter work_dirs/adapter-orig --to original

Checkpoints: tensors keep their dtype (bf16 stays bf16) and values; original -> native -> original gives identical
tensors and config.json. The native layout loads with transformers.AutoModelForImageTextToText, and with
AutoProcessor where torchvision is installed (InternVLProcessor's video processor needs it), and serves in vLLM and
LMDeploy without remote code; the original layout is what the reference code, vLLM, LMDeploy and SGLang read through
the release's remote code (.py files): from an -hf source pass --remote_code DIR (`internvl-tune export --check DIR`
says what a folder lacks). The source's tokenizer, generation, processor and remote-code files
are copied along, nothing else (a training run's logs and checkpoints stay behind).

LoRA adapters (a directory with adapter_config.json): --to original keys the adapter by the original InternVL2
module names, for vLLM and peft on the reference model; where the original fuses q/k/v (InternViT qkv, InternLM2
wqkv) it holds the exact fused equivalent. --to native rewrites an adapter in the current format (older folders).

A training run's checkpoint-N of a full fine-tune converts like a checkpoint (its base model with the trained tensors
of that step); a LoRA run's checkpoint-N goes through merge-lora instead."""


def register(subparsers, name: str, help_text: str) -> None:
    from internvl_tune.cli.flags import add_bool_flag, add_dtype_flag

    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint directory (original or native layout), LoRA adapter directory, or a "
                                    "training run's checkpoint-N directory")
    parser.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite_output_dir)")
    parser.add_argument("--to", choices=("original", "native"), required=True, help="layout to write")
    add_dtype_flag(parser, "keep", "cast the weights of a checkpoint (default: keep each tensor's dtype)",
                   special=("keep",))
    parser.add_argument("--base", default=None,
                        help="adapters: with --to native, the base to record (checked to be the same model: e.g. the "
                             "-hf conversion of the recorded base, which peft's AutoPeftModel loads); for adapters "
                             "written before the current format, the base that tells the LLM's head layout (default: "
                             "the one recorded in the adapter)")
    add_remote_code_flags(parser)
    add_bool_flag(parser, "merge", False,
                  "adapters with --to original, for vLLM (whose LoRA covers the LLM only and ignores modules_to_save): "
                  "write DST/base (the base with the adapter's whole trained parts: ViT, projector, LM head) and "
                  "DST/adapter (the LoRA matrices alone, recording DST/base)")
    add_bool_flag(parser, "overwrite_output_dir", False, "replace a non-empty DST", aliases=("--overwrite",))
    parser.set_defaults(func=run)


def add_remote_code_flags(parser) -> None:
    """``--remote_code DIR`` and ``--without_remote_code``: what an original-layout output does about the release's
    .py files, which its servers need (docs/checkpoints.md, "Serving"); shared with merge-lora."""
    from internvl_tune.cli.flags import add_bool_flag

    parser.add_argument("--remote_code", default=None, metavar="DIR",
                        help="original layout from a source without the release's .py files (an -hf checkpoint): the "
                             "original-layout release folder to copy them from (vLLM, LMDeploy and SGLang need them)")
    add_bool_flag(parser, "without_remote_code", False,
                  "original layout: write it even without the release's .py files (for the reference code and "
                  "internvl-tune; servers will not load it)")


def remote_code_args(args) -> dict:
    return {"remote_code": args.remote_code, "require_remote_code": not args.without_remote_code}


def run(args: argparse.Namespace) -> int:
    from internvl_tune.cli.flags import torch_dtype
    from internvl_tune.errors import UserError
    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.lora import adapter_dir_of, has_lora
    from internvl_tune.models.internvl_chat.lora_convert import convert_adapter, split_for_llm_lora
    from internvl_tune.models.internvl_chat.training_checkpoint import is_training_checkpoint, load_checkpoint_model

    lora_checkpoint = is_training_checkpoint(args.src) and (Path(args.src) / "adapter").is_dir()  # its adapter/
    if is_training_checkpoint(args.src) and not lora_checkpoint:
        chat = load_checkpoint_model(args.src)
        if has_lora(chat):
            raise UserError(f"{args.src} is a checkpoint of a LoRA run — merge it into its base model with "
                            f"`internvl-tune merge-lora {args.src} --output_dir DIR --layout {args.to}`")
        if args.dtype == "keep":  # the base's dtype, as merge-lora keeps it
            from internvl_tune.models.internvl_chat.loading import iter_tensors

            chat.model.to(next(iter_tensors(chat.source_dir))[1].dtype)
        else:
            chat.model.to(torch_dtype(args.dtype))
        out = chat.save_pretrained(args.dst, layout=args.to, overwrite=args.overwrite_output_dir,
                                   **remote_code_args(args))
        print(f"wrote {args.to} layout ({chat.family}) of {args.src} to {out}")
        return 0
    if not (Path(args.src) / "config.json").is_file() and adapter_dir_of(args.src) is not None:
        if args.dtype != "keep":
            raise UserError("--dtype applies to checkpoints; an adapter keeps the dtype it was trained in")
        if args.merge and args.to == "original":
            base_dir, adapter_dir = split_for_llm_lora(args.src, args.dst, base=args.base,
                                                       overwrite=args.overwrite_output_dir, **remote_code_args(args))
            print(f"wrote {base_dir} (the base with the adapter's whole trained parts) and {adapter_dir} (the LoRA "
                  "matrices under original names): serve them together, e.g. vllm serve BASE --trust-remote-code --enable-lora "
                  "--lora-modules run=ADAPTER")
            return 0
        if args.merge:
            raise UserError("--merge applies to adapters converted --to original (for vLLM); use merge-lora to fold "
                            "an adapter into its base")
        out = convert_adapter(args.src, args.dst, args.to, base=args.base, overwrite=args.overwrite_output_dir)
        print(f"wrote the adapter keyed by {args.to} module names to {out}")
        saved = json.loads((out / "adapter_config.json").read_text()).get("modules_to_save") or []
        if args.to == "original" and saved:
            print(f"warning: the adapter also holds whole trained modules (modules_to_save: {', '.join(saved)}); "
                  "vLLM's LoRA ignores them and would serve the base's. Serve the merged model instead "
                  f"(internvl-tune merge-lora {args.src} --output_dir DIR), or convert with --merge", file=sys.stderr)

        return 0
    chat = load_pretrained(args.src, dtype=torch_dtype(args.dtype), device="cpu")
    out = chat.save_pretrained(args.dst, layout=args.to, overwrite=args.overwrite_output_dir, **remote_code_args(args))

    print(f"wrote {args.to} layout ({chat.family}) to {out}")
    return 0
