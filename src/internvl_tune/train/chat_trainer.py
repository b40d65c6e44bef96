"""InternVL2 chat fine-tuning: one lean loop for 1 CPU process up to many GPUs and nodes (FSDP2).

Launch: ``internvl-tune train --model_name_or_path ... --meta_path ...`` (one process), or
``torchrun --nproc_per_node N -m internvl_tune.cli train ...`` (N ranks; gloo on CPU, NCCL on GPUs).

The loss of an optimizer step is ``sum(w_t * ce_t) / sum(w_t)`` over *all* supervised tokens of the global batch
(every micro-step, every rank), so results do not depend on how the global batch is split across GPUs and
accumulation steps (the reference's ``loss_reduction_all_gather``, made exact).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from internvl_tune.dist import DistInfo, all_reduce_sum, init_distributed
from internvl_tune.dist.fsdp import materialize_from_rank0, parallelize
from internvl_tune.errors import UserError
from internvl_tune.train.chat_batch import ChatCollator
from internvl_tune.train.chat_module import ChatTrainModule
from internvl_tune.train.compile import compile_blocks, compile_enabled
from internvl_tune.train.config import TrainConfig
from internvl_tune.train.freeze import apply_trainable_flags
from internvl_tune.train.optim import build_param_groups, count_parameters
from internvl_tune.train.progress import StepProgress
from internvl_tune.train.loop import LoopTrainer, TrainResult, run_trainer
from internvl_tune.train.runtime import make_loader, prepare_output_dir
from internvl_tune.train.sampler import GlobalBatchSampler, PackedBatchSampler
from internvl_tune.train.step import StepRunner, to_device


def _save_into(chat, output_dir: Path) -> None:
    """Save the model in the original layout next to the run's logs and checkpoints (as the reference does).

    It is written to a temporary sibling first; files then move in one by one, weights before ``config.json``,
    so a crash never leaves a config that points at missing weights.
    """
    import shutil

    tmp = output_dir / ".final-model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    chat.save_pretrained(tmp, layout="original", overwrite=True)
    files = sorted(tmp.iterdir(), key=lambda f: f.name == "config.json")
    for f in files:
        os.replace(f, output_dir / f.name)
    tmp.rmdir()


def build_datasets(cfg: TrainConfig, chat, info: DistInfo):
    """The training dataset (and validation dataset when ``--eval_meta_path`` is set)."""
    from internvl_tune.data import DataConfig, SupervisedDataset

    d = cfg.data
    data_cfg = DataConfig(
        force_image_size=d.force_image_size,
        patch_size=chat.patch_size,
        down_sample_ratio=d.down_sample_ratio,
        dynamic_image_size=d.dynamic_image_size,
        use_thumbnail=d.use_thumbnail,
        min_dynamic_patch=d.min_dynamic_patch,
        max_dynamic_patch=d.max_dynamic_patch,
        max_seq_length=d.max_seq_length,
        normalize_type=d.normalize_type,
        min_num_frame=d.min_num_frame,
        max_num_frame=d.max_num_frame,
        pad2square=d.pad2square,
        conv_style=d.conv_style,
        allow_outside_root=d.allow_outside_root,
    )
    train = SupervisedDataset(d.meta_path, chat.tokenizer, data_cfg, is_train=True, seed=cfg.train.seed)
    val = None
    if d.eval_meta_path:
        val = SupervisedDataset(d.eval_meta_path, chat.tokenizer, data_cfg, is_train=False, seed=cfg.train.seed)
    return train, val


def load_for_training(cfg: TrainConfig, dtype: torch.dtype, weights: bool = True):
    """The chat model as training starts from it: the checkpoint (or, ``weights=False``, its structure on the meta
    device), trainable flags and LoRA adapters (initialised from ``--seed``), fp32 master copies of what trains.

    Returns:
        ``(chat, trainable parameter counts per part)``.
    """
    from internvl_tune.models.internvl_chat import load_pretrained

    m = cfg.model
    chat = load_pretrained(m.model_name_or_path, dtype=dtype, device="cpu", weights=weights,
                           select_layer=m.vision_select_layer, ps_version=m.ps_version, drop_path_rate=m.drop_path_rate)
    torch.manual_seed(cfg.train.seed)  # the same LoRA initialisation on every rank and for any world size
    parts = apply_trainable_flags(chat, m)
    for p in chat.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return chat, parts


class ChatTrainer(LoopTrainer):
    """InternVL2 chat fine-tuning; the loop itself is :class:`LoopTrainer`'s."""

    name, unit = "train", "tokens"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        t = cfg.train
        if not cfg.model.model_name_or_path:
            raise UserError("--model_name_or_path is required (a checkpoint directory such as ./pretrained/InternVL2-1B)")
        if not cfg.data.meta_path:
            raise UserError("--meta_path is required (a meta JSON naming your JSONL datasets)")
        self.info = info = init_distributed(t.device)
        self.output_dir, resume = prepare_output_dir(cfg, info)
        torch.manual_seed(t.seed)
        self.compute_dtype = torch.bfloat16 if (t.bf16 and info.device.type == "cuda") else None
        load_dtype = torch.bfloat16 if self.compute_dtype is not None else torch.float32

        # Several ranks: each builds the structure only; rank 0 alone reads the checkpoint and broadcasts it
        # into the shards (one full copy in host memory for the whole job, not one per rank).
        sharded = info.world_size > 1
        chat, self.trainable_parts = load_for_training(cfg, load_dtype, weights=not sharded)
        self.chat = chat
        if cfg.data.force_image_size != chat.image_size:
            raise UserError(
                f"--force_image_size {cfg.data.force_image_size} differs from the checkpoint's tile size "
                f"{chat.image_size}; pass --force_image_size {chat.image_size}"
            )
        if cfg.model.grad_checkpoint:
            chat.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.trainable, self.total_params = count_parameters(chat.model)
        if self.trainable == 0:
            raise UserError("no parameter is trainable: check --freeze_llm / --freeze_backbone / --freeze_mlp / LoRA flags")

        self.module = ChatTrainModule(chat)
        if not sharded:
            self.module.to(info.device)
        m = cfg.model
        random_recompute = m.grad_checkpoint and bool(m.use_llm_lora or m.use_backbone_lora or m.drop_path_rate)
        self.compiled = compile_enabled(t.torch_compile, info.device, random_recompute) and compile_blocks(self.module) > 0
        parallelize(self.module, param_dtype=self.compute_dtype)
        if sharded:
            full = {}
            if info.is_main:
                source, _ = load_for_training(cfg, load_dtype)
                full = {f"model.{k}": v for k, v in source.model.state_dict().items()}
            materialize_from_rank0(self.module, full, info.device)
            del full

        self.train_set, self.val_set = build_datasets(cfg, chat, info)
        pad_id = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else 0
        self.collate = ChatCollator(cfg.data.use_packed_ds, pad_id, chat.img_context_token_id, chat.num_image_token,
                                    cfg.data.loss_reduction)
        if cfg.data.use_packed_ds:
            self.sampler = PackedBatchSampler(
                self.train_set.lengths, cfg.data.max_packed_tokens, info.world_size, info.rank,
                t.gradient_accumulation_steps, t.seed,
                tiles=getattr(self.train_set, "tiles", None), max_tiles=cfg.data.num_images_expected,
            )
        else:
            self.sampler = GlobalBatchSampler(
                self.train_set.lengths, t.per_device_train_batch_size, info.world_size, info.rank,
                t.gradient_accumulation_steps, t.seed, cfg.data.group_by_length,
            )
        steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))
        groups = build_param_groups(self.module.named_parameters(), t.learning_rate, t.weight_decay)
        self.start_run(groups, resume)
        self.stepper = StepRunner(self.module, self.optimizer, self.schedule, info, t.max_grad_norm)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list[dict]):
        """Queue forward/backward over the micro-batches of one global step, then clip and update."""
        return self.stepper(micro_batches, self.step)

    def sync_due(self) -> bool:
        t = self.cfg.train
        return self.val_set is not None and self.due(t.eval_steps or t.save_steps)

    def after_step(self, progress: StepProgress) -> None:
        """Validation loss every ``--eval_steps`` (default: at each save) when ``--eval_meta_path`` is set."""
        if self.sync_due():
            val = self.evaluate()
            self.metrics.log(self.step, {"eval_loss": val})
            progress.print(f"step {self.step}: eval_loss {val:.4f}")

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted validation loss over the whole validation set (sharded across ranks)."""
        info = self.info
        self.module.eval()
        indices = list(range(info.rank, len(self.val_set), info.world_size))
        batches = [indices[i : i + self.cfg.train.per_device_train_batch_size]
                   for i in range(0, len(indices), self.cfg.train.per_device_train_batch_size)]
        total = torch.zeros((), device=info.device)
        weight = torch.zeros((), device=info.device)
        for batch in make_loader(self.val_set, batches, self.collate, 0):
            total += self.module(to_device(batch, info.device))
            weight += batch["loss_weight"].sum().to(info.device)
        self.module.train()
        return (all_reduce_sum(total) / all_reduce_sum(weight).clamp_min(1e-12)).item()

    def export(self) -> Path:
        """Write the final model into ``output_dir`` in the original InternVL layout (LoRA: adapter + merged).

        The sharded parameters are gathered to rank 0, assigned into a fresh CPU structure of the base model with the
        same trainable flags, and saved from there, so the exported files never depend on how training was sharded.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        from internvl_tune.dist import barrier
        from internvl_tune.models.internvl_chat import load_pretrained
        from internvl_tune.models.internvl_chat.lora import (
            has_lora,
            merge_lora,
            save_adapter,
        )

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.info.is_main:
            # the structure only: every tensor comes from the gathered state, so the checkpoint is not read again
            fresh = load_pretrained(self.cfg.model.model_name_or_path, dtype=torch.float32, device="cpu",
                                    weights=False, select_layer=self.cfg.model.vision_select_layer,
                                    ps_version=self.cfg.model.ps_version)
            apply_trainable_flags(fresh, self.cfg.model)
            state = {k.removeprefix("model."): v.float() if v.is_floating_point() else v for k, v in full.items()}
            fresh.model.load_state_dict(state, strict=True, assign=True)
            if has_lora(fresh):
                save_adapter(fresh, self.output_dir / "adapter", base=self.cfg.model.model_name_or_path)
                if self.cfg.model.merge_lora:
                    merge_lora(fresh)
            if not has_lora(fresh):
                _save_into(fresh, self.output_dir)
            print(f"final model written to {self.output_dir}")
        barrier()
        return self.output_dir

    def memory_estimate(self):
        """Peak GPU memory per rank predicted for this run (``train/memory.py``), printed before the first step."""
        from internvl_tune.dist.fsdp import decoder_blocks
        from internvl_tune.train.memory import estimate_training_memory

        text = self.chat.model.config.text_config
        d, t = self.cfg.data, self.cfg.train
        tokens = d.max_packed_tokens if d.use_packed_ds else t.per_device_train_batch_size * max(self.train_set.lengths)
        return estimate_training_memory(
            self.module, decoder_blocks(self.module), world_size=self.info.world_size,
            tokens_per_micro_batch=min(tokens, d.max_packed_tokens if d.use_packed_ds else tokens),
            hidden=text.hidden_size, ffn=text.intermediate_size, num_layers=text.num_hidden_layers,
            grad_checkpoint=self.cfg.model.grad_checkpoint, compiled=self.compiled,
            compute_bytes=2 if self.compute_dtype is not None else 4, vocab=text.vocab_size)

    def plan_lines(self) -> list[str]:
        t = self.cfg.train
        global_batch = t.per_device_train_batch_size * self.info.world_size * t.gradient_accumulation_steps
        lines = [
            f"model: {self.cfg.model.model_name_or_path} ({self.chat.family}), "
            f"{self.trainable / 1e6:.2f}M of {self.total_params / 1e6:.2f}M parameters trainable "
            + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.trainable_parts.items()),
            f"data: {len(self.train_set)} samples, global batch {global_batch} "
            f"({t.per_device_train_batch_size} x {self.info.world_size} ranks x {t.gradient_accumulation_steps} accum), "
            f"{self.sampler.steps_per_epoch} steps/epoch, {self.total_steps} steps"
            + (f", packed rows of {self.cfg.data.max_packed_tokens} tokens ({self.sampler.padding_waste():.1%} padding)"
               if self.cfg.data.use_packed_ds else ""),
            f"device: {self.info.device} x {self.info.world_size}, compute dtype "
            f"{self.compute_dtype or torch.float32}, torch.compile {'on' if self.compiled else 'off'}, output: {self.output_dir}",
        ]
        lines.append(self.memory_estimate().describe())
        return lines


def run(cfg: TrainConfig) -> TrainResult:
    """Train (or describe, with ``--dry_run``), export the final model, and tear down the process group."""
    return run_trainer(ChatTrainer, cfg)
