"""InternVL-C/G retrieval fine-tuning (ITC + ITM) on Flickr30K / Flickr30K-CN / COCO: full, head or LoRA.

Launch: ``internvl-tune retrieval-train --model_name_or_path ./pretrained/InternVL-14B-224px ...`` (one process),
``torchrun --nproc_per_node N -m internvl_tune.cli retrieval-train ...`` or the scripts under ``shell/finetune``,
``shell/head_finetune`` and ``shell/lora_finetune``.

Each rank contrasts its local rows against the embeddings gathered from every rank (gather-with-gradient), so the
loss and the gradients equal those of one process holding the whole global batch. With gradient accumulation each
micro-step is its own contrastive batch and the step's loss is the mean over micro-steps (as the transformers
Trainer the reference runs on).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import default_collate

from internvl_tune.dist import all_reduce_sum, gather_with_grad, init_distributed
from internvl_tune.dist.fsdp import parallelize
from internvl_tune.errors import DataError, UserError
from internvl_tune.train.loop import LoopTrainer, TrainResult, run_trainer
from internvl_tune.train.layer_decay import layer_decay_lr_scale
from internvl_tune.train.optim import build_param_groups, count_parameters
from internvl_tune.train.compile import compile_blocks, compile_enabled
from internvl_tune.train.retrieval_config import (
    RetrievalConfig,
    RetrievalDataArgs,
    RetrievalModelArgs,
)
from internvl_tune.train.retrieval_loss import retrieval_loss
from internvl_tune.train.runtime import (
    prepare_output_dir,
)
from internvl_tune.train.sampler import GlobalBatchSampler
from internvl_tune.train.step import to_device

LORA_DROPOUT = 0.05
# The reference's LoRA targets, as full-name patterns of InternVLModel (cross-attention projections are not targets).
VIT_LORA = r"vision_model\.encoder\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
QLLAMA_LORA = r"qllama\.model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|down_proj|up_proj))"
FEATURE_KEYS = ("pixel_values", "negative_input_ids", "negative_attention_mask", "positive_input_ids",
                "positive_attention_mask", "summarize_input_ids", "summarize_attention_mask")
LOG_KEYS = ("loss", "loss_itm", "loss_itc", "pos_match_acc", "neg_match_acc", "vision_similarity")


# ----------------------------------------------------------------------------------------------- trainable parameters
def _set(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def add_lora(model: nn.Module, backbone_rank: int, qllama_rank: int) -> None:
    """LoRA (dropout 0.05) on the ViT and/or QLLaMA linears, as the reference wraps them with peft.

    ``lora_alpha`` is ``2 * backbone_rank`` for *both* parts: the reference passes ``use_backbone_lora * 2`` to the
    QLLaMA wrapper too. With equal ranks (every shipped recipe) that is the usual ``alpha = 2 r``; with
    ``use_backbone_lora 0`` the QLLaMA adapter is scaled by 0 and learns nothing. Inside a wrapped part only the
    adapters train (peft's ``get_peft_model`` freezes the rest of the part); other parts keep their flags.
    """
    from peft import LoraConfig, inject_adapter_in_model

    parts = {"vision_model.": (VIT_LORA, backbone_rank), "qllama.": (QLLAMA_LORA, qllama_rank)}
    parts = {prefix: spec for prefix, spec in parts.items() if spec[1]}
    if not parts:
        return
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    alpha = 2 * backbone_rank
    patterns = {pattern: rank for pattern, rank in parts.values()}
    first = next(iter(patterns.values()))
    config = LoraConfig(r=first, lora_alpha=alpha, lora_dropout=LORA_DROPOUT,
                        target_modules="^(" + "|".join(patterns) + ")$",
                        rank_pattern=patterns, alpha_pattern={p: alpha for p in patterns})
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():  # peft froze everything but the adapters: restore the other parts
        wrapped = name.startswith(tuple(parts))
        p.requires_grad_("lora_" in name if wrapped else before.get(name, p.requires_grad))


def apply_trainable_flags(model: nn.Module, args: RetrievalModelArgs) -> dict[str, int]:
    """Freeze / unfreeze / LoRA-wrap an ``InternVLModel`` in the reference's order.

    freeze_model -> freeze_vision_model -> freeze_qllama -> backbone / QLLaMA LoRA -> unfreeze_crossattn ->
    unfreeze_qllama_head (``qllama.lm_head.weight``, which is the tied input embedding, and ``text_projection``).

    Returns:
        Trainable parameter counts per part, for the run log.
    """
    _set(model, True)
    if args.freeze_model:
        _set(model, False)
    if args.freeze_vision_model:
        _set(model.vision_model, False)
    if args.freeze_qllama:
        _set(model.qllama, False)
    add_lora(model, args.use_backbone_lora, args.use_qllama_lora)
    if args.unfreeze_crossattn:
        for name, p in model.qllama.named_parameters():
            if "cross_attn" in name:
                p.requires_grad_(True)
    if args.unfreeze_qllama_head:
        model.qllama.lm_head.weight.requires_grad_(True)
        model.text_projection.requires_grad_(True)
    counts = dict.fromkeys(("vision", "qllama", "heads"), 0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = "vision" if name.startswith("vision_model.") else "qllama" if name.startswith("qllama.") else "heads"
            counts[part] += p.numel()
    return counts


# ----------------------------------------------------------------------------------------------- data
def dataset_spec(d: RetrievalDataArgs) -> dict:
    """``{"root", "annotation"}`` of ``--dataset_name``: a custom registry entry, or a built-in set under ``--data_root``."""
    from internvl_tune.data.retrieval import BUILTIN_TRAIN_SETS, load_dataset_registry

    registry = load_dataset_registry(d.custom_datasets) if d.custom_datasets else {}
    if d.dataset_name in registry:
        return registry[d.dataset_name]
    if d.dataset_name in BUILTIN_TRAIN_SETS:  # the reference's ./data/... paths, re-rooted at --data_root
        return {k: str(Path(d.data_root) / Path(v).relative_to("data"))
                for k, v in BUILTIN_TRAIN_SETS[d.dataset_name].items()}
    known = sorted(BUILTIN_TRAIN_SETS) + sorted(registry)
    raise UserError(f"--dataset_name {d.dataset_name!r} is unknown; choose one of {', '.join(known)}, or register it "
                    f"in a --custom_datasets file ({{name: {{root, annotation}}}}, name containing flickr_format or "
                    f"coco_format)")


def build_dataset(cfg: RetrievalConfig, tokenizer):
    from internvl_tune.data.retrieval import RetrievalTrainDataset, train_pairs

    d = cfg.data
    spec = dataset_spec(d)
    if not Path(spec["root"]).is_dir():
        raise DataError(f"image folder of {d.dataset_name} not found", spec["root"],
                        "pass --data_root (the folder holding flickr30k/ and coco/), e.g. --data_root examples/sample; "
                        "`internvl-tune data prepare` lists what to download")
    pairs = train_pairs(d.dataset_name, spec)
    return RetrievalTrainDataset(pairs, tokenizer, d.force_image_size, d.max_seq_length, seed=cfg.train.seed)


# ----------------------------------------------------------------------------------------------- the trained module
class RetrievalTrainModule(nn.Module):
    """Wraps an ``InternVLModel`` so FSDP2 has one root; ``forward(batch)`` returns the loss terms of the micro-batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # the only child: parameter names are "model." + the checkpoint's keys
        # FSDP2 cannot shard 0-D parameters: logit_scale trains as a [1] tensor (same value; the loss broadcasts
        # it) and goes back to its checkpoint shape [] on export (see `checkpoint_state`).
        for name, p in list(model.named_parameters()):
            if p.ndim == 0:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, nn.Parameter(p.detach().reshape(1), p.requires_grad))

    def checkpoint_state(self, full: dict[str, torch.Tensor], reference: nn.Module) -> dict[str, torch.Tensor]:
        """A gathered state dict of this module as the state dict of ``reference`` (an ``InternVLModel``)."""
        shapes = {k: v.shape for k, v in reference.state_dict().items()}
        out = {}
        for key, value in full.items():
            key = key.removeprefix("model.")
            out[key] = value.reshape(shapes[key]) if key in shapes else value
        return out

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        feats = self.model.retrieval_features(**{k: batch[k] for k in FEATURE_KEYS})
        return retrieval_loss(feats["itm_logits"], feats["image_itc"], feats["text_itc"], feats["backbone"],
                              feats["logit_scale"], batch["image_ids"], gather_fn=gather_with_grad)


class RetrievalTrainer(LoopTrainer):
    """Holds the state of one run; ``train()`` is the loop, ``train_step()`` one optimizer step."""

    name, unit = "retrieval-train", "samples"
    collate = staticmethod(default_collate)

    def __init__(self, cfg: RetrievalConfig):
        from internvl_tune.models.internvl_cg.loading import load_internvl_cg
        from internvl_tune.models.internvl_cg.tokenizer import load_tokenizer

        self.cfg = cfg
        m, d, t = cfg.model, cfg.data, cfg.train
        if not m.model_name_or_path:
            raise UserError("--model_name_or_path is required (e.g. ./pretrained/InternVL-14B-224px)")
        if t.eval_steps:
            raise UserError("retrieval-train has no validation pass; evaluate checkpoints with "
                            "`internvl-tune eval retrieval --pretrained OUTPUT_DIR`")
        self.info = info = init_distributed(t.device)
        self.output_dir, resume = prepare_output_dir(cfg, info)
        torch.manual_seed(t.seed)
        self.compute_dtype = torch.bfloat16 if (t.bf16 and info.device.type == "cuda") else None
        self.load_dtype = torch.bfloat16 if self.compute_dtype is not None else torch.float32

        model = load_internvl_cg(m.model_name_or_path, dtype=self.load_dtype, device="cpu",
                                 force_image_size=d.force_image_size, drop_path_rate=m.drop_path_rate)
        if model.config.image_size != d.force_image_size:
            raise UserError(f"{m.model_name_or_path} runs at {model.config.image_size} px (its config's "
                            f"force_image_size); pass --force_image_size {model.config.image_size}")
        self.trainable_parts = apply_trainable_flags(model, m)
        if m.use_qllama_lora and not m.use_backbone_lora and info.is_main:
            print("warning: --use_qllama_lora without --use_backbone_lora gets lora_alpha 0 (the reference takes "
                  "alpha from the backbone rank), so the QLLaMA adapter learns nothing")
        for p in model.parameters():  # fp32 master weights for everything that trains
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        model.set_gradient_checkpointing(m.grad_checkpoint)
        self.trainable, self.total_params = count_parameters(model)
        if self.trainable == 0:
            raise UserError("no parameter is trainable: check the --freeze_* / --unfreeze_* / LoRA flags")
        self.model_config = model.config
        self.module = RetrievalTrainModule(model).to(info.device).train()
        random_recompute = m.grad_checkpoint and bool(m.use_backbone_lora or m.use_qllama_lora or m.drop_path_rate)
        self.compiled = compile_enabled(t.torch_compile, info.device, random_recompute) and compile_blocks(self.module) > 0
        parallelize(self.module, param_dtype=self.compute_dtype)

        self.tokenizer = load_tokenizer(m.model_name_or_path, add_eos_token=True)
        self.train_set = build_dataset(cfg, self.tokenizer)
        # every sample has the same shape, so length grouping has nothing to gain
        self.sampler = GlobalBatchSampler([1] * len(self.train_set), t.per_device_train_batch_size, info.world_size,
                                          info.rank, t.gradient_accumulation_steps, t.seed, group_by_length=False)
        steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))
        lr_scale = None
        if m.use_custom_trainer:
            lr_scale = layer_decay_lr_scale(model.config.vision_config.num_hidden_layers,
                                            model.config.qllama_config.num_hidden_layers,
                                            m.vit_layer_decay_rate, m.qllama_layer_decay_rate, prefix="model.")
        self.groups = build_param_groups(self.module.named_parameters(), t.learning_rate, t.weight_decay, lr_scale)
        self.start_run(self.groups, resume)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list[dict]) -> dict:
        """Forward/backward over one global step's micro-batches, clip, update; returns the step's numbers.

        A step whose loss or gradient norm is not finite is not applied (``finite`` is False).
        """
        info, t = self.info, self.cfg.train
        sums = torch.zeros(len(LOG_KEYS), device=info.device)
        for batch in micro_batches:
            out = self.module(to_device(batch, info.device))
            (out["loss"] / len(micro_batches)).backward()
            sums += torch.stack([out[k].detach().float() for k in LOG_KEYS]) / len(micro_batches)
        params = [p for p in self.module.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        values = (all_reduce_sum(sums) / info.world_size).tolist()  # the step's one host sync
        lr = self.schedule.apply(self.optimizer, self.step)
        finite = math.isfinite(values[0]) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**dict(zip(LOG_KEYS, values)), "grad_norm": float(grad_norm), "lr": lr, "finite": finite,
                "work": self.sampler.global_batch}

    def log_fields(self, out: dict) -> dict:
        return {k: out[k] for k in (*LOG_KEYS, "lr", "grad_norm")}

    def status(self, out: dict, row: dict) -> str:
        return (f"loss {out['loss']:.4f} (itc {out['loss_itc']:.3f}, itm {out['loss_itm']:.3f}) | "
                f"{row['samples_per_s']:.1f} samples/s | {row['memory_gib']:.1f} GiB")

    def export(self) -> Path:
        """Write the final model into ``output_dir`` in the reference layout (LoRA merged), with the tokenizer.

        The sharded parameters are gathered to rank 0 and loaded into a fresh CPU copy of the base model with the
        same trainable flags (so LoRA layers exist to receive the adapters), which is then merged and saved; so
        ``internvl-tune eval retrieval --pretrained OUTPUT_DIR`` and the reference's loaders read it directly.
        """
        from types import SimpleNamespace

        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        from internvl_tune.dist import barrier
        from internvl_tune.models.internvl_cg.loading import (
            load_internvl_cg,
            save_internvl_cg,
        )
        from internvl_tune.models.internvl_chat.lora import merge_lora

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.info.is_main:
            m = self.cfg.model
            fresh = load_internvl_cg(m.model_name_or_path, dtype=self.load_dtype, device="cpu",
                                     force_image_size=self.cfg.data.force_image_size)
            apply_trainable_flags(fresh, m)
            fresh.load_state_dict(self.module.checkpoint_state(full, fresh), strict=True)
            merge_lora(SimpleNamespace(model=fresh))  # folds every peft LoRA layer of `.model` into its base linear
            save_internvl_cg(fresh, self.output_dir, tokenizer_dir=m.model_name_or_path)
            print(f"final model written to {self.output_dir}")
        barrier()
        return self.output_dir

    def plan_lines(self) -> list[str]:
        t, m = self.cfg.train, self.cfg.model
        decay = (f"layer-wise lr decay vit {m.vit_layer_decay_rate} / qllama {m.qllama_layer_decay_rate}, "
                 f"{len(self.groups)} param groups" if m.use_custom_trainer else f"{len(self.groups)} param groups")
        lines = [
            f"model: {m.model_name_or_path} at {self.model_config.image_size} px, {self.trainable / 1e6:.2f}M of "
            f"{self.total_params / 1e6:.2f}M parameters trainable ("
            + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.trainable_parts.items()) + f"); {decay}",
            f"data: {self.cfg.data.dataset_name}, {len(self.train_set)} captions, global batch "
            f"{self.sampler.global_batch} ({t.per_device_train_batch_size} x {self.info.world_size} ranks x "
            f"{t.gradient_accumulation_steps} accum), {self.sampler.steps_per_epoch} steps/epoch, {self.total_steps} steps",
            f"device: {self.info.device} x {self.info.world_size}, compute dtype {self.compute_dtype or torch.float32}, "
            f"torch.compile {'on' if self.compiled else 'off'}, "
            f"output: {self.output_dir}",
        ]
        return lines


def run(cfg: RetrievalConfig) -> TrainResult:
    """Train (or describe, with ``--dry_run``), export the final model, and tear down the process group."""
    return run_trainer(RetrievalTrainer, cfg)
