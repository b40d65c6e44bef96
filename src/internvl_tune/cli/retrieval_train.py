"""``internvl-tune retrieval-train``: InternVL-C/G retrieval fine-tuning with the reference's flag names."""

from __future__ import annotations

import argparse
import os

from internvl_tune.errors import UserError

# The reference reads the layer-decay rates from these variables; here they are only defaults of the two flags.
DECAY_ENV = {"VIT_LAYER_DECAY_RATE": "vit_layer_decay_rate", "QLLAMA_LAYER_DECAY_RATE": "qllama_layer_decay_rate"}

EPILOG = """recipes (the reference's; scripts under shell/finetune, shell/head_finetune, shell/lora_finetune):
  full : --force_image_size 364 --drop_path_rate 0.3 --use_custom_trainer   (VIT_/QLLAMA_LAYER_DECAY_RATE=0.9)
  head : --freeze_model --freeze_vision_model --freeze_qllama --unfreeze_qllama_head
  LoRA : the head flags + --use_backbone_lora 16 --use_qllama_lora 16

examples:
  internvl-tune retrieval-train --model_name_or_path ./pretrained/InternVL-14B-224px \\
      --dataset_name flickr30k_en_train --data_root ./data --output_dir work_dirs/flickr_head \\
      --freeze_model --freeze_vision_model --freeze_qllama --unfreeze_qllama_head --bf16 True
  torchrun --nproc_per_node 8 -m internvl_tune.cli retrieval-train --config my_run.yaml
  internvl-tune retrieval-train --config my_run.yaml --resume_from_checkpoint auto
  internvl-tune eval retrieval --dataset flickr30k --dataset_root ./data/flickr30k --model_name_or_path OUTPUT_DIR

Booleans take an optional value: --freeze_model, --freeze_model True and --freeze_model False all work.
Precedence: flags > --config YAML > VIT_LAYER_DECAY_RATE / QLLAMA_LAYER_DECAY_RATE > defaults."""


def sections() -> dict:
    """The run-config sections of retrieval fine-tuning."""
    from internvl_tune.data.retrieval import RetrievalDataArgs
    from internvl_tune.models.internvl_cg.recipe import RetrievalModelArgs
    from internvl_tune.train.config import TrainArgs

    return {"model": RetrievalModelArgs, "data": RetrievalDataArgs, "train": TrainArgs}


def register(subparsers, name: str, help_text: str) -> None:
    from internvl_tune.models.internvl_cg.recipe import IGNORED_FLAGS
    from internvl_tune.train.config import add_training_command

    add_training_command(subparsers, name, help_text, EPILOG, sections(), IGNORED_FLAGS, run)


def env_defaults(environ=os.environ) -> dict[str, dict]:
    """Layer-decay defaults from the environment, as the reference's launch scripts set them."""
    model = {}
    for var, key in DECAY_ENV.items():
        if environ.get(var):
            try:
                model[key] = float(environ[var])
            except ValueError:
                raise UserError(f"environment variable {var}={environ[var]!r} is not a number") from None
    return {"model": model}


def run(args: argparse.Namespace) -> int:
    from internvl_tune.dist import gather_with_grad
    from internvl_tune.models.internvl_cg.recipe import RetrievalRecipe
    from internvl_tune.train.config import load_config
    from internvl_tune.train.trainer import run as run_trainer

    cfg = load_config(args, sections(), env_defaults())
    if cfg.train.eval_steps:
        raise UserError("retrieval-train has no validation pass; evaluate checkpoints with "
                        "`internvl-tune eval retrieval --model_name_or_path OUTPUT_DIR`")
    result = run_trainer(RetrievalRecipe(cfg.model, cfg.data, gather_with_grad), cfg)
    return result.exit_status
