"""Run configuration: three typed sections, as the reference's ``ModelArguments`` / ``DataTrainingArguments`` /
``TrainingArguments``, with the reference's flag names.

``model`` and ``data`` come from the recipe of the model family (``models/internvl_chat/recipe.ModelArgs`` +
``data.config.DataConfig``, or ``models/internvl_cg/recipe.RetrievalModelArgs`` + ``data.retrieval.
RetrievalDataArgs``); ``train`` is :class:`TrainArgs`, shared by both. Every field is a flag ``--name``
(``--flag``, ``--flag True`` and ``--flag False`` all work for booleans, so the reference's launch scripts run
unchanged). Precedence: command line > ``--config file.yaml`` > environment defaults > dataclass defaults. The
resolved config is written to ``<output_dir>/config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from internvl_tune.errors import UserError
from internvl_tune.options import add_dataclass_flags, base_type, option, str2bool


@dataclass
class TrainArgs:
    """Training flags shared by every recipe (the reference's ``TrainingArguments`` that apply)."""

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
    deepspeed: str | None = option(None, "a DeepSpeed JSON config, translated onto FSDP2: ZeRO stage -> resharding, "
                                         "CPU offload, bf16, clipping, batch sizes, AdamW and warm-up settings "
                                         "(\"auto\" = the flag's value); keys that cannot be honoured are refused by "
                                         "name (docs/training.md)")
    bf16: bool = option(False, "bf16 compute with fp32 master weights (GPU); on CPU the run stays in fp32")
    logging_steps: int = option(1, "log every N optimizer steps")
    save_steps: int = option(500, "checkpoint every N optimizer steps")
    save_total_limit: int | None = option(None, "keep only the newest N checkpoints")
    save_strategy: str = option("steps", "when to checkpoint", ("steps", "epoch", "no"))
    eval_steps: int = option(0, "validation loss every N steps, for runs with a validation set (0 = at each save)")
    eval_generate: int = option(0, "at each validation, also generate answers for N validation samples (spread "
                                   "over the set) and log their scores (exact match, ANLS, ...) beside the loss; the "
                                   "answers go to eval_predictions/step-N.jsonl (0 = off)")
    eval_generate_tokens: int = option(128, "most new tokens per answer of --eval_generate")
    report_to: str = option("auto", "metric sinks besides metrics.jsonl/csv and the PNG plots, comma-separated: "
                                    "tensorboard, wandb, mlflow (each needs its package), all (every installed "
                                    "one), none, or auto: tensorboard when installed")
    run_name: str | None = option(None, "the run's name in W&B, MLflow and the plot titles (default: the output "
                                        "folder's name; WANDB_NAME overrides it in W&B)")
    dataloader_num_workers: int = option(2, "data-loading worker processes per rank")
    torch_compile: str = option("auto", "torch.compile each ViT and LLM block once, with a symbolic sequence length "
                                        "(fused norms, RoPE and activations; about a minute at start): auto = on GPUs",
                                ("auto", "True", "False"))
    max_bad_steps: int = option(10, "stop after this many skipped steps with non-finite loss or gradients")
    max_skipped_samples: str = option("0", "unusable samples (bad line, missing or corrupt image, ...) to replace by "
                                           "the next usable one before the run stops: a count, or a fraction of the "
                                           "samples seen such as 0.01; 0 stops at the first (each one is listed in "
                                           "skipped_samples.jsonl and train.log)")
    device: str | None = option(None, "cuda or cpu (default: cuda when available)")
    dry_run: bool = option(False, "load model and data, print the plan and memory estimate, then exit")


# Reference TrainingArguments flags every training command accepts and ignores (the recipes add their own).
IGNORED_FLAGS = {
    "--do_train": "always true",
    "--tf32": "enabled on GPUs that support it",
    "--remove_unused_columns": "not applicable",
}


@dataclass
class RunConfig:
    """The resolved configuration of one run: the recipe's ``model`` and ``data`` sections, :class:`TrainArgs`, and,
    for model families with several training objectives, the ``objective`` section (the chosen objective and the
    flags of every registered one: ``models.internvl_chat.objectives.objective_section``)."""

    model: Any
    data: Any
    train: TrainArgs = field(default_factory=TrainArgs)
    objective: Any = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def build_arg_parser(parser: argparse.ArgumentParser, sections: dict, ignored_flags: dict[str, str]) -> argparse.ArgumentParser:
    """Add ``--config``, one flag per field of each section, and the accepted-but-ignored reference flags (the
    trainer's :data:`IGNORED_FLAGS` and the recipe's ``ignored_flags``)."""
    ignored_flags = {**IGNORED_FLAGS, **ignored_flags}
    parser.add_argument("--config", default=None, help="YAML file with model:, data:, train: sections (or flat keys)")
    for name, cls in sections.items():
        add_dataclass_flags(parser.add_argument_group(f"{name} options"), cls, section=name)
    ignored = parser.add_argument_group("reference flags accepted and ignored")
    for flag, why in ignored_flags.items():
        ignored.add_argument(flag, nargs="?", const=True, default=None, help=f"ignored: {why}", dest=f"ignored.{flag[2:]}")
    return parser


def add_training_command(subparsers, name: str, help_text: str, epilog: str, sections: dict,
                         ignored_flags: dict[str, str], func) -> argparse.ArgumentParser:
    """The sub-command ``name`` of a training CLI: its run-config flags (:func:`build_arg_parser`), running ``func``."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    build_arg_parser(parser, sections, ignored_flags)
    parser.set_defaults(func=func)
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


def load_config(args: argparse.Namespace, sections: dict, defaults: dict[str, dict] | None = None) -> RunConfig:
    """Resolve dataclass defaults < ``defaults`` (e.g. from the environment) < ``--config`` YAML < flags.

    Args:
        args: flags parsed by a parser built with :func:`build_arg_parser` over the same ``sections``.
        sections: ``{"model": dataclass, "data": dataclass, "train": TrainArgs}``.
        defaults: ``{section: {key: value}}`` placed just above the dataclass defaults.
    """
    values: dict[str, dict] = {name: {} for name in sections}
    explicit: dict[str, dict] = {name: {} for name in sections}  # set by --config or a flag
    for section, items in (defaults or {}).items():
        for key, value in items.items():
            values[section][key] = _coerce(sections, section, key, value, "defaults")
    if getattr(args, "config", None):
        for section, items in _yaml_values(Path(args.config), sections).items():
            explicit[section].update(items)
    for dest, value in vars(args).items():
        if "." in dest and not dest.startswith("ignored."):
            section, key = dest.split(".", 1)
            explicit[section][key] = value
    for section, items in explicit.items():
        values[section].update(items)
    cfg = RunConfig(**{name: cls(**values[name]) for name, cls in sections.items()})
    if getattr(cfg.train, "deepspeed", None):  # its values sit between the defaults and explicit settings
        from internvl_tune.train.deepspeed import apply_deepspeed, world_size_from_env

        cfg.train = apply_deepspeed(cfg.train, explicit["train"], world_size_from_env())
    return cfg


def save_config(cfg, path: Path) -> None:
    """Write the resolved config as YAML (readable back with ``--config``)."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
