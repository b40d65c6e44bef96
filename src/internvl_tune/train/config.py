"""Typed configuration for InternVL2 chat fine-tuning, with the reference's flag names.

Three sections, as the reference's ``ModelArguments`` / ``DataTrainingArguments`` / ``TrainingArguments``: every
field is a flag ``--name`` (``--flag``, ``--flag True`` and ``--flag False`` all work for booleans, so the
reference's launch scripts run unchanged). Precedence: command line > ``--config file.yaml`` > defaults. The
resolved config is written to ``<output_dir>/config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from internvl_tune.errors import UserError


def option(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelArgs:
    model_name_or_path: str | None = option(None, "checkpoint directory (original InternVL layout or transformers-native)")
    freeze_llm: bool = option(False, "freeze the language model")
    freeze_backbone: bool = option(False, "freeze the vision encoder (InternViT)")
    freeze_mlp: bool = option(False, "freeze the vision-language projector (mlp1)")
    unfreeze_vit_layers: int = option(0, "after freezing, make these ViT layers trainable again: N = layers[N:], -4 = the last 4")
    vision_select_layer: int = option(-1, "ViT layer whose features feed the projector (-1 = last)")
    use_backbone_lora: int = option(0, "LoRA rank for the ViT (0 = off); alpha = 2 x rank, dropout 0.05")
    use_llm_lora: int = option(0, "LoRA rank for the LLM (0 = off); alpha = 2 x rank, dropout 0.05")
    unfreeze_lm_head: bool = option(False, "train the LM head even when the LLM is frozen or LoRA-wrapped")
    grad_checkpoint: bool = option(True, "activation checkpointing on every LLM and ViT block")
    drop_path_rate: float = option(0.0, "stochastic depth for the ViT (linear over layers, as the reference)")
    ps_version: str = option("v2", "pixel-shuffle version", ("v1", "v2"))
    merge_lora: bool = option(True, "for LoRA runs, also write the merged model as the final output")


@dataclass
class DataArgs:
    meta_path: str | None = option(None, "meta JSON naming the datasets: {name: {root, annotation, data_augment, repeat_time, length}}")
    eval_meta_path: str | None = option(None, "optional meta JSON for validation loss")
    conv_style: str = option("internlm2-chat", "conversation template", ("internlm2-chat", "Hermes-2", "phi3-chat", "internvl2_5", "plain"))
    max_seq_length: int = option(8192, "truncate longer samples (never through image tokens: tiles shrink first)")
    force_image_size: int = option(448, "tile size in pixels")
    down_sample_ratio: float = option(0.5, "pixel-shuffle ratio (0.5 -> 256 tokens per 448 tile)")
    pad2square: bool = option(False, "pad images to square instead of resizing (untiled path only)")
    dynamic_image_size: bool = option(False, "tile each image into up to max_dynamic_patch 448 tiles by aspect ratio")
    use_thumbnail: bool = option(False, "append a whole-image thumbnail tile when an image has more than one tile")
    min_dynamic_patch: int = option(1, "fewest tiles per image")
    max_dynamic_patch: int = option(12, "most tiles per image (split across the images of a multi-image sample)")
    min_num_frame: int = option(8, "fewest frames sampled from a video")
    max_num_frame: int = option(32, "most frames sampled from a video")
    normalize_type: str = option("imagenet", "pixel normalisation", ("imagenet", "clip", "siglip"))
    use_packed_ds: bool = option(False, "pack several samples into one row of max_packed_tokens (attention kept per sample)")
    max_packed_tokens: int = option(8192, "token budget of a packed row")
    num_images_expected: int = option(40, "most tiles in a packed row")
    loss_reduction: str = option("token", "loss weight of each supervised token: token=1, sample=1/n, square=1/sqrt(n)", ("token", "sample", "square"))
    group_by_length: bool = option(True, "batch samples of similar length together (less padding)")
    allow_outside_root: bool = option(False, "allow image paths that resolve outside their dataset root")


@dataclass
class TrainArgs:
    output_dir: str = option("work_dirs/run", "run directory: checkpoints, logs, plots, final model")
    overwrite_output_dir: bool = option(False, "start fresh even if output_dir holds checkpoints")
    resume_from_checkpoint: str | None = option(None, "checkpoint dir to resume from, or 'auto' for the latest in output_dir")
    seed: int = option(42, "seed for data order, augmentation and init")
    num_train_epochs: float = option(1.0, "epochs (fractional allowed)")
    max_steps: int = option(-1, "optimizer steps; overrides num_train_epochs when > 0")
    per_device_train_batch_size: int = option(1, "samples per GPU per micro-step")
    gradient_accumulation_steps: int = option(1, "micro-steps per optimizer step")
    learning_rate: float = option(4e-5, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases, norms and 1-D params)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    warmup_ratio: float = option(0.0, "warm-up as a fraction of all steps")
    warmup_steps: int = option(0, "warm-up steps (overrides warmup_ratio when > 0)")
    lr_scheduler_type: str = option("cosine", "learning-rate schedule after warm-up", ("cosine", "linear", "constant"))
    max_grad_norm: float = option(1.0, "clip the global gradient norm (0 = off)")
    bf16: bool = option(False, "bf16 compute with fp32 master weights (GPU); on CPU the run stays in fp32")
    logging_steps: int = option(1, "log every N optimizer steps")
    save_steps: int = option(500, "checkpoint every N optimizer steps")
    save_total_limit: int | None = option(None, "keep only the newest N checkpoints")
    save_strategy: str = option("steps", "when to checkpoint", ("steps", "epoch", "no"))
    eval_steps: int = option(0, "validation loss every N steps when --eval_meta_path is set (0 = at each save)")
    report_to: str = option("tensorboard", "metric sinks besides JSONL/CSV: tensorboard or none")
    dataloader_num_workers: int = option(2, "data-loading worker processes per rank")
    torch_compile: str = option("auto", "torch.compile each ViT and LLM block once, with a symbolic sequence length "
                                "(fused norms, RoPE and activations; about a minute at start): auto = on GPUs, except "
                                "LoRA or drop-path runs with --grad_checkpoint",
                                ("auto", "True", "False"))
    max_bad_steps: int = option(10, "stop after this many skipped steps with non-finite loss or gradients")
    device: str | None = option(None, "cuda or cpu (default: cuda when available)")
    dry_run: bool = option(False, "load model and data, print the plan and memory estimate, then exit")


@dataclass
class TrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelArgs, "data": DataArgs, "train": TrainArgs}
# Reference flags we accept and ignore, because our loop decides them itself (said in --help).
IGNORED_FLAGS = {
    "--deepspeed": "ZeRO is replaced by FSDP2 sharding",
    "--evaluation_strategy": "validation runs when --eval_meta_path is set",
    "--do_train": "always true",
    "--tf32": "enabled on GPUs that support it",
    "--use_fast_tokenizer": "fast tokenizers are always used",
    "--remove_unused_columns": "not applicable",
    "--use_data_resampling": "not supported yet",
}


def str2bool(text: str) -> bool:
    """Parse the reference's boolean flag values (``True``/``False``, also yes/no/1/0)."""
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def base_type(tp):
    """``int | None`` -> int; ``str`` -> str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_dataclass_flags(parser: argparse.ArgumentParser, section: str, cls) -> None:
    """Add one ``--field`` flag per dataclass field, defaulting to SUPPRESS so YAML values are not overwritten."""
    group = parser.add_argument_group(f"{section} options")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = base_type(hints[f.name])
        kwargs = dict(default=argparse.SUPPRESS, dest=f"{section}.{f.name}")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if tp is bool:
            group.add_argument(f"--{f.name}", nargs="?", const=True, type=str2bool, metavar="True|False", help=help_text, **kwargs)
        else:
            group.add_argument(f"--{f.name}", type=tp, choices=f.metadata.get("choices"), help=help_text,
                               metavar=f.name.upper() if not f.metadata.get("choices") else None, **kwargs)


def build_arg_parser(parser: argparse.ArgumentParser, sections: dict | None = None,
                     ignored_flags: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """Add ``--config``, one flag per field of each section, and the accepted-but-ignored reference flags."""
    sections = SECTIONS if sections is None else sections
    ignored_flags = IGNORED_FLAGS if ignored_flags is None else ignored_flags
    parser.add_argument("--config", default=None, help="YAML file with `model:`, `data:`, `train:` sections (or flat keys)")
    for name, cls in sections.items():
        add_dataclass_flags(parser, name, cls)
    ignored = parser.add_argument_group("reference flags accepted and ignored")
    for flag, why in ignored_flags.items():
        ignored.add_argument(flag, nargs="?", const=True, default=None, help=f"ignored: {why}", dest=f"ignored.{flag[2:]}")
    return parser


def _coerce(sections: dict, section: str, key: str, value, where: str):
    cls = sections[section]
    if key not in {f.name for f in dataclasses.fields(cls)}:
        raise UserError(f"{where}: unknown key {section}.{key}; see the command's --help for the list")
    if value is None:
        return None
    tp = base_type(typing.get_type_hints(cls)[key])
    try:
        return str2bool(value) if tp is bool and not isinstance(value, bool) else tp(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise UserError(f"{where}: {section}.{key}: {exc}") from None


def _yaml_values(path: Path, sections: dict) -> dict[str, dict]:
    """``{section: {key: value}}`` from a YAML file with sections or flat keys."""
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections or keys")
    values: dict[str, dict] = {name: {} for name in sections}
    for key, value in raw.items():
        if key in sections and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                values[key][sub_key] = _coerce(sections, key, sub_key, sub_value, str(path))
            continue
        section = next((s for s, cls in sections.items() if key in {f.name for f in dataclasses.fields(cls)}), None)
        if section is None:
            raise UserError(f"{path}: unknown config key {key!r}; see the command's --help for the list")
        values[section][key] = _coerce(sections, section, key, value, str(path))
    return values


def load_config(args: argparse.Namespace, sections: dict | None = None, root_cls=None,
                defaults: dict[str, dict] | None = None):
    """Resolve dataclass defaults < ``defaults`` (e.g. from the environment) < ``--config`` YAML < flags.

    Args:
        args: flags parsed by a parser built with :func:`build_arg_parser` over the same ``sections``.
        sections: ``{name: dataclass}`` (default: the chat trainer's); ``root_cls`` builds the result from them.
        defaults: ``{section: {key: value}}`` placed just above the dataclass defaults.
    """
    sections = SECTIONS if sections is None else sections
    root_cls = TrainConfig if root_cls is None else root_cls
    values: dict[str, dict] = {name: {} for name in sections}
    for section, items in (defaults or {}).items():
        for key, value in items.items():
            values[section][key] = _coerce(sections, section, key, value, "defaults")
    if getattr(args, "config", None):
        for section, items in _yaml_values(Path(args.config), sections).items():
            values[section].update(items)
    for dest, value in vars(args).items():
        if "." in dest and not dest.startswith("ignored."):
            section, key = dest.split(".", 1)
            values[section][key] = value
    return root_cls(**{name: cls(**values[name]) for name, cls in sections.items()})


def save_config(cfg, path: Path) -> None:
    """Write the resolved config as YAML (readable back with ``--config``)."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
