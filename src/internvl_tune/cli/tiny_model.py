"""``internvl-tune tiny-model --like internvl2-1b --out DIR``: a tiny random checkpoint with a release's exact layout."""

from __future__ import annotations

import argparse

from internvl_tune.cli.flags import add_flag

EPILOG = """examples:
  internvl-tune tiny-model --like internvl2-1b --out ./pretrained/tiny-InternVL2-1B
  internvl-tune tiny-model --like internvl2-26b --out /tmp/tiny26b --image_size 28
  internvl-tune tiny-model --like internvl-14b --out /tmp/tiny-InternVL-14B-224px   (InternVL-C/G layout)

The files (config.json keys, safetensors key names, tokenizer files) match the named release; widths and depths are
tiny and the weights random, so it is for smoke tests of a pipeline, not for answers. internvl2-1b carries the real
Qwen2 tokenizer; the other families get a small tokenizer trained on the spot in their file format."""


INTERNVL_14B = "internvl-14b"  # InternVL-14B-224px: InternViT-6B + QLLaMA (InternVL-C/G)


def register(subparsers, name: str, help_text: str) -> None:
    from internvl_tune.testing.tiny_chat import SIZES

    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--like", required=True, choices=sorted(SIZES) + [INTERNVL_14B], help="which release to imitate")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    add_flag(parser, "--image_size", "--image-size", type=int, default=None,
             help="tile size (default 56 for InternVL2, a multiple of 28; 28 for internvl-14b)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from internvl_tune.errors import UserError
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty — choose a new --out directory")
    if args.like == INTERNVL_14B:
        from internvl_tune.testing.tiny_cg import write_tiny_internvl14b

        write_tiny_internvl14b(out, seed=args.seed, image_size=args.image_size or 28)
    else:
        write_tiny_checkpoint(args.like, out, seed=args.seed, image_size=args.image_size or 56)
    print(f"wrote a tiny {args.like} checkpoint to {out}")
    return 0
