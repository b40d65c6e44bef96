"""``internvl-tune tiny-model --like internvl3-8b --output_dir DIR``: a tiny random checkpoint with a release's
layout."""


from __future__ import annotations

import argparse

from internvl_tune.cli.flags import add_flag

EPILOG = """examples:
  internvl-tune tiny-model --like internvl2-1b --output_dir ./pretrained/tiny-InternVL2-1B
  internvl-tune tiny-model --like internvl2_5-8b --output_dir /tmp/tiny2_5-8b
  internvl-tune tiny-model --like internvl3-38b --output_dir /tmp/tiny3-38b --image_size 28
  internvl-tune tiny-model --like internvl3-1b-hf --output_dir /tmp/tiny3-1b-hf   (transformers' native "-hf" layout)
  internvl-tune tiny-model --like internvl3_5-8b --output_dir /tmp/tiny3_5-8b      (InternVL3.5: Qwen3, its tokenizer)
  internvl-tune tiny-model --like internvl-14b --output_dir /tmp/tiny-InternVL-14B-224px   (InternVL-C/G layout)

The files (config.json keys, safetensors key names, tokenizer files) follow the named release; widths and depths are
tiny and the weights random, so it is for smoke tests of a pipeline, not for answers. The Qwen2 / Qwen2.5 ones carry
the real Qwen tokenizer; the other LLMs get a small tokenizer trained on the spot in their file format."""


INTERNVL_14B = "internvl-14b"  # InternVL-14B-224px: InternViT-6B + QLLaMA (InternVL-C/G)


def register(subparsers, name: str, help_text: str) -> None:
    from internvl_tune.testing.tiny_chat import NATIVE_RELEASES, RELEASES

    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--like", required=True, choices=[*RELEASES, *NATIVE_RELEASES, INTERNVL_14B], help="which release to imitate")
    add_flag(parser, "--output_dir", "--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    add_flag(parser, "--image_size", "--image-size", type=int, default=None,
             help="tile size (default 56 for InternVL2 / 2.5 / 3, a multiple of 28; 28 for internvl-14b)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from internvl_tune.errors import UserError
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty — choose a new --output_dir")

    if args.like == INTERNVL_14B:
        from internvl_tune.testing.tiny_cg import write_tiny_internvl14b

        write_tiny_internvl14b(out, seed=args.seed, image_size=args.image_size or 28)
    else:
        write_tiny_checkpoint(args.like, out, seed=args.seed, image_size=args.image_size or 56)
    print(f"wrote a tiny {args.like} checkpoint to {out}")
    return 0
