"""``--deepspeed ds_config.json``: a DeepSpeed config translated onto this trainer (FSDP2), or refused key by key.

Users of the transformers Trainer (and the reference's launch scripts) bring a DeepSpeed file. What it asks for maps
onto FSDP2 and the training flags like this (docs/training.md, "DeepSpeed configs"):

- ``zero_optimization.stage`` 3: each block's gathered parameters are freed after its forward and gathered again
  for its backward (FSDP2 ``reshard_after_forward=True``); stages 0, 1 and 2: they stay gathered from the forward to
  the backward (``reshard_after_forward=False``: ZeRO-2's memory and traffic). Gradients and optimizer state are
  sharded in every stage (stages 0 and 1 keep whole gradients: less memory here, the same numbers).
- ``offload_optimizer`` / ``offload_param`` with ``device: cpu``: FSDP2's ``CPUOffloadPolicy`` (sharded parameters,
  gradients, optimizer state and the optimizer step on the CPU; ``pin_memory`` passed on).
- ``bf16.enabled`` -> ``--bf16``; ``gradient_clipping`` -> ``--max_grad_norm``; ``train_micro_batch_size_per_gpu``,
  ``gradient_accumulation_steps`` -> the flags of those names, ``train_batch_size`` checked against them and the
  world size; ``optimizer`` (AdamW, or Adam in its default AdamW mode) -> ``--learning_rate``, ``--adam_beta1/2``,
  ``--adam_epsilon``, ``--weight_decay``; ``scheduler`` WarmupLR / WarmupDecayLR / WarmupCosineLR with a linear
  warm-up from 0 -> ``--lr_scheduler_type`` constant / linear / cosine, ``--warmup_steps``, ``--max_steps``.

``"auto"`` means "the flag's value", as the transformers Trainer fills it in. A value that is not ``"auto"`` sets
the flag, unless the command line or ``--config`` sets that flag to something else: then the run stops naming both,
as the transformers Trainer refuses a mismatch. Performance knobs without an FSDP2 counterpart (bucket sizes,
overlap, prefetch limits) and DeepSpeed's own logging are named in the plan line as not applicable; they change
speed or logs, never the numbers. Anything else, or a value that cannot be honoured (fp16 with loss scaling, NVMe
offload, another optimizer, a log-shaped warm-up), is refused with every such key named at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl_tune.errors import UserError

# The reference's DeepSpeed files (InternVL internvl_chat/), by name: its launch scripts pass them relative to the
# folder they run in, where a copy of our scripts has none. Every value in them is "auto" or a performance knob; only
# the ZeRO stage and the offload matter.
REFERENCE_CONFIGS = {
    "zero_stage1_config.json": {"zero_optimization": {"stage": 1}},
    "zero_stage2_config.json": {"zero_optimization": {"stage": 2}},
    "zero_stage3_config.json": {"zero_optimization": {"stage": 3}},
    "zero_stage3_config_34b.json": {"zero_optimization": {"stage": 3}},
    "zero_stage3_config_70b.json": {"zero_optimization": {"stage": 3}},
    "zero_stage3_config_100b.json": {"zero_optimization": {"stage": 3}},
    "zero_stage3_config_100b_1e8.json": {"zero_optimization": {"stage": 3}},
    "zero_stage3_config_100b_1e7_offload.json": {"zero_optimization": {
        "stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
        "offload_optimizer": {"device": "cpu", "pin_memory": True}}},
}

# DeepSpeed performance knobs with no FSDP2 counterpart (FSDP2 sizes its own buckets and prefetches one block)
_ZERO_TUNING = {
    "allgather_partitions", "allgather_bucket_size", "overlap_comm", "reduce_scatter", "reduce_bucket_size",
    "contiguous_gradients", "sub_group_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save", "round_robin_gradients", "elastic_checkpoint",
    "load_from_fp32_weights", "ignore_unused_parameters", "zero_hpz_partition_size", "zero_quantized_weights",
    "zero_quantized_gradients", "memory_efficient_linear", "use_multi_rank_bucket_allreduce", "cpu_offload",
    "offload_optimizer.buffer_count", "offload_optimizer.fast_init", "offload_optimizer.pipeline_read",
    "offload_optimizer.pipeline_write", "offload_optimizer.ratio", "offload_param.buffer_count",
    "offload_param.buffer_size", "offload_param.max_in_cpu",
}
# top-level sections and keys that change only speed or DeepSpeed's own logs
_TOP_TUNING = {
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "prescale_gradients",
    "gradient_predivide_factor", "communication_data_type", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet",
    "comms_logger", "activation_checkpointing", "aio", "data_types", "checkpoint", "timers", "monitor_config",
    "gradient_accumulation_dtype",
    "fp16", "amp", "bf16", "bfloat16",  # their other knobs (loss scaling, ...), once "enabled" is translated
}
# DeepSpeed schedulers that are one of ours: (our --lr_scheduler_type, the param holding the peak lr)
_SCHEDULERS = {"warmuplr": "constant", "warmupdecaylr": "linear", "warmupcosinelr": "cosine"}


@dataclass
class Translation:
    """What a DeepSpeed file asks of a run.

    Attributes:
        settings: training-flag values (``TrainArgs`` field -> value) the file fixes; "auto" entries are absent.
        sources: for each of ``settings``, the DeepSpeed key it came from (for mismatch errors).
        stage: the ZeRO stage (0 to 3).
        reshard_after_forward: FSDP2's choice for the blocks on several ranks (False for stages 0-2).
        offload: FSDP2 ``CPUOffloadPolicy`` on (parameters, gradients and optimizer step on the CPU).
        pin_memory: pin the offloaded tensors (DeepSpeed's ``pin_memory``; FSDP2's default is True).
        not_applicable: keys that change only speed or logs, named in the plan.
        origin: where the file came from (its path, or the reference's file of that name).
    """

    settings: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    stage: int = 0
    reshard_after_forward: bool = False
    offload: bool = False
    pin_memory: bool = True
    not_applicable: list[str] = field(default_factory=list)
    origin: str = ""

    def plan_line(self, world_size: int) -> str:
        """One line of the run plan: what the file turned into."""
        if world_size == 1:
            shard = "one rank: nothing to shard"
        elif self.reshard_after_forward:
            shard = "FSDP2 frees each block's gathered parameters after its forward (reshard_after_forward=True)"
        else:
            shard = "FSDP2 keeps each block's parameters gathered from forward to backward (reshard_after_forward=False)"
        parts = [f"ZeRO-{self.stage} -> {shard}"]
        if self.offload:
            parts.append(f"offload -> FSDP2 CPUOffloadPolicy(pin_memory={self.pin_memory}): parameters, gradients "
                         "and the AdamW step on the CPU")
        if self.settings:
            parts.append("sets " + ", ".join(f"--{k} {v}" for k, v in self.settings.items()))
        if self.not_applicable:
            parts.append("not applicable (speed or logging knobs): " + ", ".join(self.not_applicable))
        return f"deepspeed {self.origin}: " + "; ".join(parts)


def load_deepspeed_config(path: str) -> tuple[dict, str]:
    """The JSON of ``--deepspeed PATH`` and where it came from; a reference file name that is not here is taken as
    the reference's file of that name (``REFERENCE_CONFIGS``)."""
    file = Path(path)
    if file.is_file():
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"--deepspeed {path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise UserError(f"--deepspeed {path}: expected a JSON object (a DeepSpeed config)")
        return raw, path
    if file.name in REFERENCE_CONFIGS and len(file.parts) == 1:
        return REFERENCE_CONFIGS[file.name], f"{path} (not here: the InternVL reference's file of that name)"
    raise UserError(f"--deepspeed {path}: file not found (give the path of a DeepSpeed JSON config, or leave the "
                    "flag out: FSDP2 shards the model without one)")


def world_size_from_env() -> int:
    """The number of ranks the launcher starts (torchrun's WORLD_SIZE, Slurm's SLURM_NTASKS), 1 without one."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _is_on(value) -> bool | str:
    """A DeepSpeed ``enabled`` value: True, False or "auto"."""
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    return bool(value)


def translate(path: str) -> Translation:
    """Read ``--deepspeed PATH`` and translate it (see the module docstring); refuse what cannot be honoured.

    Raises:
        UserError: naming every key that cannot be honoured, with what to do instead.
    """
    raw, origin = load_deepspeed_config(path)
    keys = _flatten(raw)
    out = Translation(origin=origin)
    refused: list[str] = []
    used: set[str] = set()

    def setting(flag: str, key: str, convert=lambda v: v) -> None:
        used.add(key)
        value = keys.get(key, "auto")
        if isinstance(value, str) and value.lower() == "auto":
            return
        try:
            out.settings[flag], out.sources[flag] = convert(value), key
        except (TypeError, ValueError, IndexError):
            refused.append(f"{key}={value!r} (not a number)")

    # --- ZeRO stage and offload
    used.add("zero_optimization.stage")
    stage = keys.get("zero_optimization.stage", 0)
    if stage not in (0, 1, 2, 3):
        refused.append(f"zero_optimization.stage={stage!r} (ZeRO stages are 0 to 3)")
        stage = 0
    out.stage, out.reshard_after_forward = stage, stage == 3
    for part in ("offload_optimizer", "offload_param"):
        device_key = f"zero_optimization.{part}.device"
        used.update({device_key, f"zero_optimization.{part}.pin_memory", f"zero_optimization.{part}.nvme_path"})
        device = str(keys.get(device_key, "none")).lower()
        if device == "cpu":
            out.offload = True
            out.pin_memory = out.pin_memory and bool(keys.get(f"zero_optimization.{part}.pin_memory", True))
        elif device != "none":
            refused.append(f"{device_key}={device!r} (only CPU offload exists here: FSDP2's CPUOffloadPolicy; "
                           "use \"cpu\")")

    # --- precision
    used.update({"bf16.enabled", "bfloat16.enabled", "fp16.enabled", "amp.enabled"})
    bf16 = _is_on(keys.get("bf16.enabled", keys.get("bfloat16.enabled", "auto")))
    if bf16 != "auto":
        out.settings["bf16"], out.sources["bf16"] = bf16, "bf16.enabled"
    if _is_on(keys.get("fp16.enabled", False)) is True:
        refused.append("fp16.enabled=true (fp16 with loss scaling is not implemented: FSDP2 runs bf16 with fp32 "
                       "master weights; set \"bf16\": {\"enabled\": true} and \"fp16\": {\"enabled\": false})")
    if _is_on(keys.get("amp.enabled", False)) is True:
        refused.append("amp.enabled=true (apex AMP does not exist here: use \"bf16\": {\"enabled\": true})")

    # --- clipping and batch sizes
    setting("max_grad_norm", "gradient_clipping", float)
    setting("per_device_train_batch_size", "train_micro_batch_size_per_gpu", int)
    setting("gradient_accumulation_steps", "gradient_accumulation_steps", int)
    setting("train_batch_size", "train_batch_size", int)  # checked by check_batch_size, not a flag

    # --- optimizer
    kind = keys.get("optimizer.type")
    if kind is not None:
        used.update({"optimizer.type", "optimizer.params.torch_adam", "optimizer.params.adam_w_mode"})
        if str(kind).lower() not in ("adamw", "adam"):
            refused.append(f"optimizer.type={kind!r} (the optimizer is AdamW: remove the optimizer section or use "
                           "\"AdamW\")")
        elif str(kind).lower() == "adam" and keys.get("optimizer.params.adam_w_mode", True) is False:
            refused.append("optimizer.params.adam_w_mode=false (Adam with L2 regularisation is not implemented; "
                           "the optimizer is AdamW)")
        setting("learning_rate", "optimizer.params.lr", float)
        setting("adam_beta1", "optimizer.params.betas", lambda v: float(v[0]))
        setting("adam_beta2", "optimizer.params.betas", lambda v: float(v[1]))
        setting("adam_epsilon", "optimizer.params.eps", float)
        setting("weight_decay", "optimizer.params.weight_decay", float)

    # --- scheduler
    kind = keys.get("scheduler.type")
    if kind is not None:
        used.add("scheduler.type")
        shape = _SCHEDULERS.get(str(kind).lower())
        if shape is None:
            refused.append(f"scheduler.type={kind!r} (schedules here: warm-up then cosine, linear or constant: "
                           "WarmupCosineLR, WarmupDecayLR, WarmupLR; or remove the section and use "
                           "--lr_scheduler_type)")
        else:
            out.settings["lr_scheduler_type"], out.sources["lr_scheduler_type"] = shape, "scheduler.type"
            used.add("scheduler.params.warmup_type")
            if str(keys.get("scheduler.params.warmup_type", "log")).lower() != "linear":
                refused.append("scheduler.params.warmup_type (DeepSpeed's default is a log-shaped warm-up; the "
                               "warm-up here is linear from 0: add \"warmup_type\": \"linear\", or remove the "
                               "scheduler section and use --lr_scheduler_type)")
            floors = {"warmup_min_ratio": 0, "cos_min_ratio": 1e-4} if shape == "cosine" else {"warmup_min_lr": 0}
            for floor, default in floors.items():  # (DeepSpeed's defaults)
                used.add(f"scheduler.params.{floor}")
                value = keys.get(f"scheduler.params.{floor}", default)
                if value != "auto" and value != 0:
                    refused.append(f"scheduler.params.{floor}={value!r} (the learning rate starts and ends at 0 "
                                   "here: set it to 0)")
            setting("learning_rate", "scheduler.params.warmup_max_lr", float)
            setting("warmup_steps", "scheduler.params.warmup_num_steps", int)
            setting("max_steps", "scheduler.params.total_num_steps", int)

    # --- everything else: speed and logging knobs, or refused
    for key in keys:
        if key in used:
            continue
        top, _, rest = key.partition(".")
        if (top == "zero_optimization" and rest in _ZERO_TUNING) or top in _TOP_TUNING:
            out.not_applicable.append(key)
        else:
            refused.append(f"{key} (not translated onto FSDP2; remove it)")
    if refused:
        raise UserError(f"--deepspeed {path}: cannot honour " + "; ".join(refused)
                        + ". Everything else in the file maps onto FSDP2 (docs/training.md, \"DeepSpeed configs\")")
    return out


def apply_deepspeed(train, explicit: dict, world_size: int):
    """``train`` (the run's ``TrainArgs``) with the values of its ``--deepspeed`` file, refusing a mismatch with a
    flag set explicitly (on the command line or in ``--config``), and checking ``train_batch_size``.

    Args:
        train: the resolved ``TrainArgs``; its ``deepspeed`` names the file.
        explicit: the ``train`` values set by ``--config`` or on the command line.
        world_size: ranks of the run, for ``train_batch_size``.
    """
    translation = translate(train.deepspeed)
    settings = {k: v for k, v in translation.settings.items() if k != "train_batch_size"}
    mismatched = [f"{translation.sources[k]}={v!r} but --{k} {explicit[k]!r}"
                  for k, v in settings.items() if k in explicit and explicit[k] != v]
    if mismatched:
        raise UserError(f"--deepspeed {translation.origin}: the file and the flags disagree: " + "; ".join(mismatched)
                        + ". Set the key to \"auto\" (the flag decides) or drop the flag")
    train = dataclasses.replace(train, **settings)
    total = translation.settings.get("train_batch_size")
    product = train.per_device_train_batch_size * train.gradient_accumulation_steps * world_size
    if total is not None and total != product:
        raise UserError(f"--deepspeed {translation.origin}: train_batch_size={total} but "
                        f"{train.per_device_train_batch_size} per device x {train.gradient_accumulation_steps} "
                        f"accumulation x {world_size} ranks = {product}; set train_batch_size to \"auto\" or change "
                        "the others")
    return train
