"""``internvl-tune train``: InternVL2 chat fine-tuning with the reference's flag names."""

from __future__ import annotations

import argparse

from internvl_tune.train.config import build_arg_parser, load_config

EPILOG = """examples:
  internvl-tune train --model_name_or_path ./pretrained/InternVL2-1B --conv_style Hermes-2 \\
      --meta_path ./shell/data/my_finetune.json --output_dir work_dirs/my_run --use_llm_lora 16 --bf16 True
  torchrun --nproc_per_node 8 -m internvl_tune.cli train --config my_run.yaml --per_device_train_batch_size 2
  internvl-tune train --config my_run.yaml --resume_from_checkpoint auto

Booleans take an optional value: --freeze_backbone, --freeze_backbone True and --freeze_backbone False all work.
Precedence: command-line flags > --config YAML > defaults. The resolved config is saved as OUTPUT_DIR/config.yaml."""


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    build_arg_parser(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from internvl_tune.train import chat_trainer

    result = chat_trainer.run(load_config(args))
    return 0 if result.steps > 0 or not result.interrupted else 1
