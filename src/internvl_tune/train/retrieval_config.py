"""Typed configuration for InternVL-C/G retrieval fine-tuning, with the reference's flag names.

Three sections: ``model`` and ``data`` carry the flags of the reference's ``internvl_stage2_finetune.py``
(``--freeze_model``, ``--use_backbone_lora 16``, ``--dataset_name flickr30k_en_train`` ...); ``train`` is the chat
trainer's :class:`~internvl_tune.train.config.TrainArgs` (output dir, epochs, batch size, lr, schedule, checkpoints),
so both commands share one set of training flags. Precedence: command line > ``--config file.yaml`` > environment
defaults given by the CLI (``VIT_LAYER_DECAY_RATE`` / ``QLLAMA_LAYER_DECAY_RATE``) > dataclass defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


from internvl_tune.train.config import IGNORED_FLAGS, TrainArgs, build_arg_parser, load_config, option


@dataclass
class RetrievalModelArgs:
    model_name_or_path: str | None = option(None, "InternVL-14B checkpoint directory, e.g. ./pretrained/InternVL-14B-224px")
    freeze_model: bool = option(False, "freeze every parameter (then unfreeze parts with the flags below)")
    freeze_vision_model: bool = option(False, "freeze InternViT-6B")
    freeze_qllama: bool = option(False, "freeze QLLaMA")
    unfreeze_qllama_head: bool = option(False, "train text_projection and qllama.lm_head (tied to the input embeddings, "
                                           "so those train too: the reference's 'head' recipe)")
    unfreeze_crossattn: bool = option(False, "train QLLaMA's cross-attention layers")
    use_backbone_lora: int = option(0, "LoRA rank on the ViT's attn.qkv/attn.proj/mlp.fc1/mlp.fc2 (0 = off); alpha = 2 x rank")
    use_qllama_lora: int = option(0, "LoRA rank on QLLaMA's q/k/v/o and gate/up/down projections (0 = off); alpha = "
                                 "2 x use_backbone_lora, as the reference")
    use_custom_trainer: bool = option(False, "layer-wise lr decay (the reference's custom trainer)")
    vit_layer_decay_rate: float = option(1.0, "ViT lr decay per layer with --use_custom_trainer (env VIT_LAYER_DECAY_RATE)")
    qllama_layer_decay_rate: float = option(1.0, "QLLaMA lr decay per layer with --use_custom_trainer "
                                             "(env QLLAMA_LAYER_DECAY_RATE)")
    drop_path_rate: float = option(0.0, "ViT stochastic depth (linear over layers)")
    grad_checkpoint: bool = option(True, "activation checkpointing on every ViT and QLLaMA layer (always on in the reference)")


@dataclass
class RetrievalDataArgs:
    dataset_name: str = option("flickr30k_en_train", "flickr30k_en_train, flickr30k_cn_train, coco_karpathy_train, or a "
                                                 "name from --custom_datasets")
    custom_datasets: str | None = option(None, "JSON/YAML registry {name: {root, annotation}}; names contain "
                                           "flickr_format or coco_format")
    data_root: str = option("./data", "folder holding flickr30k/ and coco/ for the built-in dataset names")
    max_seq_length: int = option(80, "caption tokens, EOS included; captions are padded to this length")
    force_image_size: int = option(224, "input resolution; 364 interpolates the 224 position embeddings")


@dataclass
class RetrievalConfig:
    model: RetrievalModelArgs = field(default_factory=RetrievalModelArgs)
    data: RetrievalDataArgs = field(default_factory=RetrievalDataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": RetrievalModelArgs, "data": RetrievalDataArgs, "train": TrainArgs}
# Reference flags accepted and ignored (said in --help); the chat trainer's list, plus the retrieval script's own.
RETRIEVAL_IGNORED_FLAGS = {
    **{k: v for k, v in IGNORED_FLAGS.items() if k in ("--deepspeed", "--evaluation_strategy", "--do_train", "--tf32",
                                                       "--remove_unused_columns")},
    "--optim": "always torch AdamW (the reference scripts pass adamw_torch)",
    "--pad_to_max_length": "captions are always padded to --max_seq_length (the reference scripts pass True)",
    "--dataloader_pin_memory": "memory is pinned when training on GPUs",
}


def build_retrieval_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config``, every section's flags and the ignored reference flags to ``parser``."""
    return build_arg_parser(parser, SECTIONS, RETRIEVAL_IGNORED_FLAGS)


def load_retrieval_config(args: argparse.Namespace, defaults: dict[str, dict] | None = None) -> RetrievalConfig:
    """Resolve dataclass defaults < ``defaults`` (e.g. from the environment) < YAML < flags."""
    return load_config(args, SECTIONS, RetrievalConfig, defaults)
