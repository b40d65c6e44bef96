"""``internvl-tune chat MODEL "question"``: ask an InternVL2 checkpoint, or a base model with a LoRA adapter, about images."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  internvl-tune chat ./pretrained/InternVL2-8B --image cat.jpg "What is the cat doing?"
  internvl-tune chat ./pretrained/InternVL2-1B --image a.jpg --image b.jpg "Image-1: <image>\\nImage-2: <image>\\nCompare them."
  internvl-tune chat ./pretrained/InternVL2-2B "Tell me a joke."          (text only)
  internvl-tune chat work_dirs/my_lora_run/adapter --image cat.jpg "What is the cat doing?"
  internvl-tune chat work_dirs/my_lora_run --base /new/place/InternVL2-2B "Hi"   (the base moved since training)

MODEL is a checkpoint directory (original or native layout), a LoRA adapter directory, a training run's output
directory (its merged or fully trained model when it holds config.json, else its adapter/), or one of the run's
checkpoint-N directories (the run's base model with the trained tensors of that step). An adapter is loaded onto
the base checkpoint recorded in its adapter_config.json (base_model_name_or_path) unless --base names another.
Prompt building and the stop token follow the checkpoint's conversation template (config.json "template"); the
system message is the one it was fine-tuned with unless --thinking_mode says otherwise. Greedy decoding unless
--temperature > 0."""


def register(subparsers, name: str, help_text: str) -> None:
    from internvl_tune.cli.flags import add_dtype_flag, add_flag
    from internvl_tune.data.templates import THINKING_MODES

    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    # (MODEL stays a required first word: an optional one would take the question's place when flags sit between)
    parser.add_argument("model", help="checkpoint directory, LoRA adapter directory, a training run's output directory, "
                                      "or one of its checkpoint-N directories")
    parser.add_argument("question", help="the question; put <image> where each image belongs (optional)")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--base", default=None,
                        help="base checkpoint for a LoRA adapter (default: the one recorded in its adapter_config.json)")
    add_flag(parser, "--max_dynamic_patch", "--max_tiles", "--max-tiles", type=int, default=None,
             help="max dynamic tiles per image (default: config)")
    add_flag(parser, "--max_new_tokens", "--max-new-tokens", type=int, default=512,
             help="stop after this many new tokens (default: 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0 samples; 0 is greedy")
    add_flag(parser, "--thinking_mode", "--thinking-mode", choices=THINKING_MODES, default="auto",
             help="on: InternVL3.5's thinking system prompt (it reasons inside <think>...</think> first; its model "
                  "card suggests --temperature 0.6), off: the template's default system message, auto: what the "
                  "checkpoint was fine-tuned with (the releases: the default) (default: auto)")
    add_dtype_flag(parser, "auto", "auto: bf16 on GPU, fp32 on CPU (default: auto)", special=("auto",))
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.set_defaults(func=run)


def load_model(path: str, base: str | None, **load_kwargs):
    """The checkpoint at ``path``, a training checkpoint, or the base model with the adapter ``path`` names (see
    EPILOG)."""
    from internvl_tune.errors import UserError
    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.lora import adapter_dir_of, load_with_adapter
    from internvl_tune.models.internvl_chat.training_checkpoint import is_training_checkpoint, load_checkpoint_model

    if is_training_checkpoint(path):
        if base is not None:
            raise UserError(f"{path} is a training checkpoint; it records its base model — drop --base")
        return load_checkpoint_model(path, **load_kwargs)

    adapter = None if base is None and (Path(path) / "config.json").is_file() else adapter_dir_of(path)
    if adapter is not None:
        return load_with_adapter(adapter, base, **load_kwargs)
    if base is not None:
        raise UserError(f"--base is for LoRA adapters, and {path} holds none (no adapter_config.json, no adapter/) — "
                        "drop --base, or pass the adapter directory")
    return load_pretrained(path, **load_kwargs)


def run(args: argparse.Namespace) -> int:

    import torch

    from internvl_tune.cli.flags import torch_dtype
    from internvl_tune.data.images import load_image
    from internvl_tune.data.templates import thinking_system_message

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(args.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    chat = load_model(args.model, args.base, dtype=dtype, device=device)
    chat.system_message = thinking_system_message(args.thinking_mode, chat.system_message)
    pixel_values, tiles = None, None
    if args.image:
        pixel_values, tiles = chat.image_processor([load_image(p, where="--image") for p in args.image],
                                                   max_tiles=args.max_dynamic_patch)
        pixel_values = pixel_values.to(device=device, dtype=dtype)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    answer = chat.chat(pixel_values=pixel_values, tiles_per_image=tiles, question=args.question,
                       max_new_tokens=args.max_new_tokens, **sampling)
    print(answer)
    return 0
