"""``internvl-tune chat MODEL_DIR --image PATH "question"``: ask an InternVL2 checkpoint about images."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  internvl-tune chat ./pretrained/InternVL2-8B --image cat.jpg "What is the cat doing?"
  internvl-tune chat ./pretrained/InternVL2-1B --image a.jpg --image b.jpg "Image-1: <image>\\nImage-2: <image>\\nCompare them."
  internvl-tune chat ./pretrained/InternVL2-2B "Tell me a joke."          (text only)

Prompt building and the stop token follow the checkpoint's conversation template (config.json "template").
Greedy decoding unless --temperature > 0."""


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint directory (original or native layout)")
    parser.add_argument("question", help="the question; put <image> where each image belongs (optional)")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--max-tiles", type=int, default=None, help="max dynamic tiles per image (default: config)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0 samples; 0 is greedy")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from internvl_tune.data.images import load_image
    from internvl_tune.models.internvl_chat import load_pretrained

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    chat = load_pretrained(args.model, dtype=dtype, device=device)
    pixel_values, tiles = None, None
    if args.image:
        pixel_values, tiles = chat.image_processor([load_image(p) for p in args.image], max_tiles=args.max_tiles)
        pixel_values = pixel_values.to(device=device, dtype=dtype)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    answer = chat.chat(pixel_values=pixel_values, tiles_per_image=tiles, question=args.question,
                       max_new_tokens=args.max_new_tokens, **sampling)
    print(answer)
    return 0
