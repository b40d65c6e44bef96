"""``internvl-tune merge-lora ADAPTER --output_dir DIR``: fold a LoRA adapter (and its trained modules) into its base
model."""


from __future__ import annotations

import argparse

EPILOG = """examples:
  internvl-tune merge-lora work_dirs/my_lora_run/adapter --output_dir work_dirs/merged
  internvl-tune merge-lora work_dirs/my_lora_run --base /new/place/InternVL2-2B --output_dir work_dirs/merged

ADAPTER is an adapter directory, a LoRA run's output directory (which holds adapter/), or one of the run's
checkpoint-N directories (a mid-run step, merged the same way). The base is the checkpoint
recorded in adapter_config.json (base_model_name_or_path) unless --base names another; a base with other shapes is
refused. Besides the LoRA updates, every module the adapter saved whole (a trained LM head, projector or ViT layers)
replaces the base's. The merged model is written in the original layout (or --layout native)."""


def register(subparsers, name: str, help_text: str) -> None:
    from internvl_tune.cli.convert import add_remote_code_flags
    from internvl_tune.cli.flags import add_bool_flag, add_dtype_flag, add_flag

    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors), a LoRA "
                                        "run's output directory, or one of its checkpoint-N directories")
    parser.add_argument("--base", default=None,
                        help="the base checkpoint the adapter was trained on (default: the one recorded in the adapter)")
    add_flag(parser, "--output_dir", "--out", required=True, help="output directory for the merged model")
    parser.add_argument("--layout", choices=("original", "native"), default="original",
                        help="checkpoint layout to write: original (InternVLChatModel; reference code, vLLM, lmdeploy) "
                             "or native (transformers InternVLForConditionalGeneration); default: original")
    add_dtype_flag(parser, "keep", "dtype of the merged weights (default: keep, the base's); the merge itself runs in "
                   "fp32", special=("keep",))
    add_remote_code_flags(parser)
    add_bool_flag(parser, "overwrite_output_dir", False, "replace a non-empty --output_dir", aliases=("--overwrite",))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from internvl_tune.cli.chat import load_model
    from internvl_tune.cli.convert import remote_code_args
    from internvl_tune.cli.flags import torch_dtype
    from internvl_tune.models.internvl_chat.loading import iter_tensors
    from internvl_tune.models.internvl_chat.lora import find_adapter, has_lora, merge_lora
    from internvl_tune.models.internvl_chat.training_checkpoint import is_training_checkpoint

    if not is_training_checkpoint(args.adapter):
        find_adapter(args.adapter)  # a plain checkpoint has nothing to merge: say what an adapter folder holds
    chat = load_model(args.adapter, args.base, dtype=torch.float32)
    if has_lora(chat):
        merge_lora(chat)
    target = torch_dtype(args.dtype) or next(iter_tensors(chat.source_dir))[1].dtype  # keep: the base's
    chat.model.to(target)
    out = chat.save_pretrained(args.output_dir, layout=args.layout, overwrite=args.overwrite_output_dir,
                               **remote_code_args(args))

    print(f"merged {args.adapter} into {chat.source_dir}: {out}")
    return 0
