"""``internvl-tune train``: InternVL2 chat fine-tuning with the reference's flag names, for every training objective of
the registry (``models/internvl_chat/objectives``: supervised, DPO / MPO preference tuning, ...)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

EPILOG = """examples:
  internvl-tune train --model_name_or_path ./pretrained/InternVL2-1B --meta_path ./shell/data/my_finetune.json \\
      --output_dir work_dirs/my_run --use_llm_lora 16 --bf16 True
  torchrun --nproc_per_node 8 -m internvl_tune.cli train --config my_run.yaml --per_device_train_batch_size 2
  internvl-tune train --config my_run.yaml --resume_from_checkpoint auto
  internvl-tune train --model_name_or_path ./pretrained/InternVL2-40B --meta_path my_meta.json --bf16 True \\
      --use_llm_lora 16 --load_in_4bit True        (QLoRA on one GPU; needs bitsandbytes)
  internvl-tune train --objective mpo --model_name_or_path ./pretrained/InternVL2_5-8B --meta_path MMPR-v1.1/meta.json \
      --output_dir work_dirs/mpo --learning_rate 1e-6   (preference pairs: question / chosen / rejected)

The template, tile size and tiling settings default to the checkpoint's config.json; flags override them.
Booleans take an optional value: --freeze_backbone, --freeze_backbone True and --freeze_backbone False all work.
Precedence: command-line flags > --config YAML > defaults. The resolved config is saved as OUTPUT_DIR/config.yaml."""


def sections() -> dict:
    """The run-config sections of chat fine-tuning (``objective``: built from the objectives' registry)."""
    from internvl_tune.data.config import DataConfig
    from internvl_tune.models.internvl_chat.objectives import objective_section
    from internvl_tune.models.internvl_chat.recipe import ModelArgs
    from internvl_tune.train.config import TrainArgs

    return {"model": ModelArgs, "data": DataConfig, "train": TrainArgs, "objective": objective_section()}


# other fine-tuning tools' spellings of --load_in_4bit (LLaMA-Factory, ms-swift), accepted as hidden aliases
QUANT_BIT_ALIASES = ("--quantization_bit", "--quant_bits")


def four_bits(text: str) -> bool:
    """The value of ``--quantization_bit`` / ``--quant_bits``: 4 is ``--load_in_4bit True``, 0 or none False."""
    value = str(text).strip().lower()
    if value in ("0", "none"):
        return False
    if value != "4":
        raise argparse.ArgumentTypeError(f"{text!r}: only 4-bit base weights are supported (--load_in_4bit True)")
    return True


def register(subparsers, name: str, help_text: str) -> None:
    from internvl_tune.models.internvl_chat.recipe import IGNORED_FLAGS
    from internvl_tune.train.config import add_training_command

    parser = add_training_command(subparsers, name, help_text, EPILOG, sections(), IGNORED_FLAGS, run)
    for alias in QUANT_BIT_ALIASES:
        parser.add_argument(alias, type=four_bits, dest="model.load_in_4bit", default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)


def collectives():
    """The process group's collectives, for the objectives' recipes (the library never imports ``dist``)."""
    from internvl_tune.dist import all_gather_object_ordered, all_reduce_sum
    from internvl_tune.dist.parallelize import gathered
    from internvl_tune.models.internvl_chat.objectives import Collectives

    return Collectives(all_reduce_sum=all_reduce_sum, all_gather_objects=all_gather_object_ordered, gathered=gathered)


def recipe(cfg):
    """The recipe of ``cfg``'s objective (``--objective``: one entry of the objectives' registry); a model built
    from parts (``--vision_path`` + ``--llm_path``) first."""
    from internvl_tune.models.internvl_chat.objectives import build_recipe
    from internvl_tune.models.internvl_chat.recipe import check_meta_files, check_parts

    model = cfg.model
    parts = check_parts(model)  # (a flag mistake first: it reads no file)
    check_meta_files(cfg.data)  # a mistake in the meta JSON is reported before any weight is read
    if parts:
        model = dataclasses.replace(model, model_name_or_path=str(model_from_parts(cfg)))
    return build_recipe(model, cfg.data, cfg.objective, collectives())


def model_from_parts(cfg) -> Path:
    """``--vision_path`` + ``--llm_path`` (+ ``--mlp_path``): rank 0 builds the model and saves it as
    OUTPUT_DIR/initial_model (kept when a folder built from the same parts is there: a resumed run); the other ranks
    wait for it (OUTPUT_DIR must be shared by the nodes, as for checkpoints)."""
    from internvl_tune.dist import barrier, init_distributed
    from internvl_tune.models.internvl_chat.assemble import save_model_from_parts
    from internvl_tune.models.internvl_chat.recipe import parts_settings

    m, t = cfg.model, cfg.train
    out = Path(t.output_dir) / "initial_model"
    info = init_distributed(t.device)
    if info.is_main:
        print(f"building the model from parts: ViT {m.vision_path} + LLM {m.llm_path}"
              f" + projector {m.mlp_path or '(new)'} -> {out}", flush=True)
        if not save_model_from_parts(out, m.vision_path, m.llm_path, parts_settings(m, cfg.data), m.mlp_path, t.seed):
            print(f"{out}: built from the same parts already, kept", flush=True)
    barrier()
    return out


def run(args: argparse.Namespace) -> int:
    from internvl_tune.train.config import load_config
    from internvl_tune.train.trainer import run as run_trainer

    cfg = load_config(args, sections())
    result = run_trainer(recipe(cfg), cfg)
    return result.exit_status
