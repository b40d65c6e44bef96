"""The InternVL2 chat fine-tuning recipe: what the one trainer (``train/trainer.py``) needs to know of this family.

- ``ModelArgs``: the model flags of the reference's ``internvl_chat_finetune.py`` (the data flags are
  ``data.config.DataConfig``);
- :func:`apply_trainable_flags`: the reference's freeze / LoRA flags, applied by name;
- :class:`ChatTrainModule`: vision tower -> pixel shuffle -> mlp1 -> image features scattered into the token
  embeddings -> LLM decoder -> weighted next-token loss on supervised positions only (``loss.py``);
- :class:`ChatRecipe`: builds the module (from the checkpoint, or its structure on the meta device), the datasets,
  the collator and the sampler, and exports the final model (LoRA: adapter + merged).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from internvl_tune.data.annotations import check_meta
from internvl_tune.data.batching import ChatBatch, ChatCollator
from internvl_tune.data.config import DataConfig
from internvl_tune.data.dataset import SupervisedDataset
from internvl_tune.data.templates import THINKING_SYSTEM_MESSAGE
from internvl_tune.errors import UserError
from internvl_tune.models.common import varlen_attention
from internvl_tune.models.common.quantize import require_bitsandbytes, set_trainable
from internvl_tune.models.common.recipe import Recipe
from internvl_tune.models.internvl_chat.loss import weighted_lm_loss_sum
from internvl_tune.options import option

# Reference flags of InternVL2 fine-tuning we accept and ignore (listed in --help; the trainer's own are in
# train/config.py).
IGNORED_FLAGS = {
    "--evaluation_strategy": "validation runs when --eval_meta_path is set",
    "--use_fast_tokenizer": "fast tokenizers are always used",
    "--use_data_resampling": "not supported yet",
    "--use_liger": "torch.compile fuses the same kernels (norms, RoPE, SwiGLU)",
    "--gradient_checkpointing": "--grad_checkpoint sets activation checkpointing",
    "--use_custom_flash_attn": "packed rows always run one causal attention per sample (flash varlen on CUDA)",
    "--split_annotations": "every rank reads only the lines of its own samples (lazy JSONL index)",
    "--max_buffer_size": "packs are planned from the length estimates of the dataset, not from a buffer",
    "--log_freq": "--logging_steps sets how often the run logs",
    "--strict_mode": "packs are filled best-fit up to --max_packed_tokens tokens and --num_images_expected tiles",
    "--allow_overflow": "packs are filled best-fit up to --max_packed_tokens tokens (a longer sample alone)",
    "--replacement": "each epoch takes every sample once",
}


@dataclass
class ModelArgs:
    """Model flags of InternVL2 fine-tuning (the reference's ``ModelArguments``)."""

    model_name_or_path: str | None = option(None, "checkpoint directory (original InternVL layout or "
                                                  "transformers-native), e.g. ./pretrained/InternVL2-8B")
    vision_path: str | None = option(None, "instead of --model_name_or_path: build a new model from an InternViT "
                                           "checkpoint and --llm_path, with a new projector (the reference's stage 0; "
                                           "written to OUTPUT_DIR/initial_model first, see docs/training.md)")
    llm_path: str | None = option(None, "the LLM checkpoint of a model built from parts (with --vision_path)")
    mlp_path: str | None = option(None, "a model built from parts takes this projector (mlp1's six tensors, e.g. "
                                        "a warm-up run's) instead of a new one")
    freeze_llm: bool = option(False, "freeze the language model and its LM head")
    freeze_backbone: bool = option(False, "freeze the vision encoder (InternViT)")
    freeze_mlp: bool = option(False, "freeze the vision-language projector (mlp1)")
    unfreeze_vit_layers: int = option(0, "after freezing, make these ViT layers trainable again: N = layers[N:], "
                                         "-4 = the last 4")
    vision_select_layer: int = option(-1, "ViT layer whose features feed the projector (-1 = last)")
    use_backbone_lora: int = option(0, "LoRA rank for the ViT (0 = off)")
    use_llm_lora: int = option(0, "LoRA rank for the LLM (0 = off)")
    lora_alpha: float | None = option(None, "LoRA scaling numerator (default: 2 x rank, as the reference)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input (the reference's 0.05; 0 makes steps "
                                       "deterministic and recomputation cheaper)")
    lora_target_modules: str | None = option(None, "comma-separated LLM linears to wrap with LoRA, e.g. "
                                                   "q_proj,v_proj, or the reference's names of the family, e.g. "
                                                   "attention.wqkv for InternLM2 (default: the reference's per "
                                                   "family: every attention and MLP linear)")
    unfreeze_lm_head: bool = option(False, "train the LM head even when the LLM is frozen or LoRA-wrapped")
    grad_checkpoint: str = option("True", "activation checkpointing: True (every ViT and LLM block), False, a "
                                          "fraction such as 0.5 (that share of the blocks: less recompute for more "
                                          "memory), selective (every block, keeping matmul and attention "
                                          "outputs: most of the speed for part of the memory), or auto (the fewest "
                                          "checkpointed blocks whose memory estimate + 15 %% fits the GPU)")
    drop_path_rate: float = option(0.0, "stochastic depth for the ViT (linear over layers, as the reference)")
    ps_version: str = option("v2", "pixel-shuffle version", ("v1", "v2"))
    merge_lora: bool = option(True, "for LoRA runs, also write the merged model as the final output")
    load_in_4bit: bool = option(False, "QLoRA: hold the LLM's linear layers in 4 bits (bitsandbytes NF4, double "
                                       "quantization, bf16 compute) on one GPU; needs --use_llm_lora or --freeze_llm. "
                                       "The merged model is the bf16 checkpoint plus the adapter (mixture-of-experts "
                                       "LLMs: the grouped experts stay in the load dtype)")
    moe_experts: str = option("auto", "mixture-of-experts LLMs (InternVL3.5-30B-A3B, 241B-A28B, GPT-OSS-20B-A4B): "
                                      "train the experts in full, keep them frozen, or put LoRA on them (rank and "
                                      "alpha of --use_llm_lora, on the routed tokens of each expert); auto = as the "
                                      "rest of the LLM: trained (the reference's 3.5 SFT), frozen with --freeze_llm, "
                                      "LoRA with --use_llm_lora", ("auto", "train", "frozen", "lora"))
    moe_router: str = option("auto", "mixture-of-experts LLMs: train the routers or keep them frozen; auto = trained "
                                     "when the experts train in full (the reference's 3.5 SFT), else frozen",
                             ("auto", "train", "frozen"))
    router_aux_loss_coef: float | None = option(None, "weight of the load-balancing loss of mixture-of-experts LLMs "
                                                      "(logged as aux_loss either way); default as the reference: "
                                                      "llm_config.router_aux_loss_coef, applied always for GPT-OSS "
                                                      "(0.9 in its release) and for Qwen3-MoE only when "
                                                      "llm_config.output_router_logits is true (0 otherwise)")


def parts_settings(model: ModelArgs, data: DataConfig) -> dict:
    """The chat settings of a model built from parts (``assemble.SETTINGS``): the flags, else the reference's
    fine-tuning defaults (``RELEASE_DEFAULTS``; the tile size: the ViT's own)."""
    from internvl_tune.data.config import RELEASE_DEFAULTS as ref

    def given(value, default):
        return default if value is None else value

    return {"template": given(data.conv_style, ref.template),
            "downsample_ratio": given(data.down_sample_ratio, ref.downsample_ratio),
            "ps_version": model.ps_version, "select_layer": model.vision_select_layer,
            "dynamic_image_size": given(data.dynamic_image_size, ref.dynamic_image_size),
            "use_thumbnail": given(data.use_thumbnail, ref.use_thumbnail),
            "min_dynamic_patch": given(data.min_dynamic_patch, ref.min_dynamic_patch),
            "max_dynamic_patch": given(data.max_dynamic_patch, ref.max_dynamic_patch),
            "force_image_size": data.force_image_size}


def check_meta_files(data: DataConfig) -> None:
    """``--meta_path`` and ``--eval_meta_path`` read, and each annotation file found, before any weight is read: a
    mistake in them (invalid JSON, a dataset name given twice, a missing annotation file) is the run's first message,
    not one that comes after minutes of loading. Every objective's meta JSON has this form. ``internvl-tune train``
    calls it first (``cli/train.py``); the recipe reads the files again when it builds the datasets."""
    for path in (data.meta_path, data.eval_meta_path):
        if path:
            check_meta(path)


def check_parts(model: ModelArgs) -> bool:
    """True when the model is to be built from parts (``--vision_path`` / ``--llm_path``); refuses half of it."""
    if not (model.vision_path or model.llm_path or model.mlp_path):
        return False
    if model.model_name_or_path:
        raise UserError("--model_name_or_path and --vision_path / --llm_path / --mlp_path name the model twice: give "
                        "a checkpoint, or the InternViT and LLM to build one from")
    if not (model.vision_path and model.llm_path):
        raise UserError("--vision_path and --llm_path build a new model together (an InternViT checkpoint and an LLM "
                        "checkpoint); --mlp_path adds a trained projector to them")
    return True


def moe_modes(args: ModelArgs) -> tuple[str, str]:
    """``(experts, router)``: what ``--moe_experts`` / ``--moe_router`` mean with the other flags (``auto`` resolved)."""
    experts = args.moe_experts
    if experts == "auto":
        experts = "lora" if args.use_llm_lora else "frozen" if args.freeze_llm else "train"
    if experts == "lora" and not args.use_llm_lora:
        raise UserError("--moe_experts lora puts LoRA on the experts with the rank of --use_llm_lora: add "
                        "--use_llm_lora R")
    router = args.moe_router if args.moe_router != "auto" else "train" if experts == "train" else "frozen"
    return experts, router


def set_moe_trainable(chat, args: ModelArgs) -> None:
    """The experts' and routers' trainable flags per :func:`moe_modes` (LoRA matrices, once added, stay trainable)."""
    from internvl_tune.models.common.moe import experts_modules
    from internvl_tune.models.internvl_chat import families

    experts, router = moe_modes(args)
    moe = families.get(chat.family).moe
    for layer in chat.model.model.language_model.layers:
        try:
            set_trainable(layer.get_submodule(moe.router), router == "train")
        except AttributeError:  # a dense layer (mlp_only_layers)
            continue
    for _, module in experts_modules(chat.model.model.language_model):
        for name, p in module.named_parameters():
            p.requires_grad_(name.startswith("lora_") if experts == "lora" else experts == "train")


def apply_trainable_flags(chat, args: ModelArgs) -> dict[str, int]:
    """Freeze / unfreeze / LoRA-wrap ``chat.model`` per ``args``, in the reference's order (``unfreeze_lm_head`` last,
    so it really takes effect): freeze_backbone -> freeze_llm -> LoRA -> the experts and routers of a
    mixture-of-experts LLM (``--moe_experts`` / ``--moe_router``) -> freeze_mlp -> unfreeze_vit_layers ->
    unfreeze_lm_head.

    Returns:
        Trainable parameter counts per part (``vision``, ``projector``, ``llm``, ``lm_head``), for the run log.
    """
    from internvl_tune.models.internvl_chat.lora import add_lora

    model = chat.model
    vision, projector = model.model.vision_tower, model.model.multi_modal_projector
    llm, lm_head = model.model.language_model, model.lm_head
    set_trainable(model, True)
    if args.freeze_backbone:
        set_trainable(vision, False)
    if args.freeze_llm:
        set_trainable(llm, False)
        set_trainable(lm_head, False)
    if args.use_backbone_lora or args.use_llm_lora:
        targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()] \
            if args.lora_target_modules else None
        add_lora(chat, llm_rank=args.use_llm_lora, vision_rank=args.use_backbone_lora, lora_alpha=args.lora_alpha,
                 lora_dropout=args.lora_dropout, llm_target_modules=targets,
                 expert_lora=moe_modes(args)[0] == "lora" and chat.is_moe)
    if chat.is_moe:
        set_moe_trainable(chat, args)
    if args.freeze_mlp:
        set_trainable(projector, False)
    if args.unfreeze_vit_layers:
        for layer in vision.encoder.layer[args.unfreeze_vit_layers :]:
            set_trainable(layer, True)
    if args.unfreeze_lm_head:
        set_trainable(lm_head, True)
    return {
        name: sum(p.numel() for p in part.parameters() if p.requires_grad)
        for name, part in (("vision", vision), ("projector", projector), ("llm", llm), ("lm_head", lm_head))
    }


class ChatTrainModule(nn.Module):
    """Wraps an ``InternVLChat`` for training; ``forward(batch)`` returns the weighted loss sum of the micro-batch.

    A mixture-of-experts LLM runs its experts as grouped products (``models/common/moe.py``) and adds the
    load-balancing loss times ``aux_loss_coef`` (0: logged, not trained on), weighted by the micro-batch's share of
    the loss normaliser like the LM loss; ``aux_loss`` is logged on its own.
    """

    def __init__(self, chat, aux_loss_coef: float = 0.0):
        super().__init__()
        self.model = chat.model  # the only registered child: FSDP2 and checkpoints see the usual parameter names
        self.chat = chat
        llm = chat.model.model.language_model
        # packed rows run one causal attention per sample (flash varlen on CUDA); padded batches keep SDPA
        llm.set_attn_implementation(varlen_attention.register())
        self.router_stats, self.aux_loss_coef = None, aux_loss_coef
        if chat.is_moe:  # its experts run grouped already (load_pretrained)
            self.router_stats = router_stats(chat)

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, ViT first: the units of checkpointing, compilation and sharding."""
        return [*self.model.model.vision_tower.encoder.layer, *self.model.model.language_model.layers]

    def forward(self, batch: ChatBatch) -> dict[str, torch.Tensor]:
        """``{"loss": sum of weight x cross-entropy}`` over the batch's supervised tokens (the step divides by the
        weight of the whole global batch)."""
        loss = weighted_lm_loss_sum(self.hidden_states(batch), self.model.lm_head.weight, batch.loss_index,
                                    batch.loss_target, batch.loss_weight)
        if self.router_stats is None:
            return {"loss": loss}
        aux = self.router_stats.loss(batch.num_tokens) * batch.weight
        return {"loss": loss + self.aux_loss_coef * aux, "aux_loss": aux}

    def hidden_states(self, batch: ChatBatch) -> torch.Tensor:
        """The LLM's last hidden states [B, L, H] of the batch, image features in place."""
        embeds = self.chat.embed_inputs(batch.input_ids, batch.pixel_values,
                                        layout={"image_tiles": batch.image_tiles,
                                                "image_positions": batch.image_positions})
        packed = {}
        if batch.packed:  # one causal attention per sample
            cu, longest = batch.cu_seq_lens, batch.max_length
            packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        if self.router_stats is not None:
            self.router_stats.start(batch.attention_mask)
        try:
            out = self.model.model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                                  position_ids=batch.position_ids, use_cache=False, **packed)
        finally:
            if self.router_stats is not None:
                self.router_stats.stop()
        return out.last_hidden_state


class ChatRecipe(Recipe):
    """InternVL2 chat fine-tuning for ``train/trainer.py`` (the ``Recipe`` protocol, ``models/common/recipe.py``).

    Supervised fine-tuning (``--objective sft``) as it is; the other objectives of ``objectives/`` subclass it.
    ``dataset_class`` reads the objective's lines and ``collator_class`` batches them.
    """

    name, unit = "train", "tokens"
    dataset_class, collator_class = SupervisedDataset, ChatCollator

    def __init__(self, model: ModelArgs, data: DataConfig):
        if not model.model_name_or_path:
            raise UserError("--model_name_or_path is required (a checkpoint directory such as ./pretrained/InternVL2-1B; "
                            "or --vision_path and --llm_path to build a new model from an InternViT and an LLM)")
        if not data.meta_path:
            raise UserError("--meta_path is required (a meta JSON naming your JSONL datasets)")
        if model.load_in_4bit:
            require_bitsandbytes()
            if not (model.use_llm_lora or model.freeze_llm):
                raise UserError("--load_in_4bit keeps the LLM's linear layers frozen in 4 bits: add --use_llm_lora R "
                                "(QLoRA) or --freeze_llm True")
        from internvl_tune.models.internvl_chat.config import checkpoint_data_defaults

        # the checkpoint's config.json fixes the template and the tiling: settled here, before any weight is read
        self.args, self.data = model, data.resolve(checkpoint_data_defaults(model.model_name_or_path),
                                                   model.model_name_or_path)
        self.chat = self.module = None
        self.trainable_parts: dict[str, int] = {}
        self.train_set = None
        self._generation_set = None  # the validation lines as prompts (--eval_generate), built at first use

    @classmethod
    def from_objective(cls, model: ModelArgs, data: DataConfig, args, collectives) -> ChatRecipe:
        """The recipe of ``--objective sft`` (no flags or collectives of its own)."""
        return cls(model, data)

    def _load_chat(self, dtype: torch.dtype, weights: bool, device="cpu", load_in_4bit: bool = False):
        from internvl_tune.models.internvl_chat.chat import load_pretrained

        m = self.args
        return load_pretrained(m.model_name_or_path, dtype=dtype, device=device, weights=weights,
                               load_in_4bit=load_in_4bit, select_layer=m.vision_select_layer,
                               ps_version=m.ps_version, drop_path_rate=m.drop_path_rate)

    def build_module(self, dtype: torch.dtype, weights: bool = True, device="cpu") -> ChatTrainModule:
        """The training module from the checkpoint (``weights=False``: its structure on the meta device), with the
        trainable flags and LoRA adapters applied.

        The model loads on the CPU; with ``--load_in_4bit`` it loads straight onto ``device``, quantizing there.
        """
        quantized = self.args.load_in_4bit
        if quantized and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise UserError(f"--load_in_4bit trains in one process on one GPU; this run has "
                            f"{torch.distributed.get_world_size()} ranks, and their 4-bit weights cannot be sharded: "
                            "launch without torchrun (or with --nproc_per_node 1), or drop --load_in_4bit to shard "
                            "the bf16 model over the ranks")
        chat = self._load_chat(dtype, weights, device if quantized else "cpu", quantized)
        self.trainable_parts = apply_trainable_flags(chat, self.args)
        module = self._training_module(chat, dtype, weights)
        if self.chat is None:  # the first build is the trained one (a second, on rank 0, only sources weights)
            self.chat, self.module = chat, module
        return module

    def _training_module(self, chat, dtype: torch.dtype, weights: bool) -> nn.Module:
        return ChatTrainModule(chat, aux_loss_coef(chat, self.args))

    @property
    def grad_checkpoint(self) -> str:
        return self.args.grad_checkpoint

    def build_data(self, seed: int, rank: int, world_size: int, per_device_batch: int, grad_accum: int):
        """``(train_set, val_set or None, collate, sampler)``."""
        from internvl_tune.data.batching import GlobalBatchSampler, PackedBatchSampler

        d, chat = self.data, self.chat
        dataset, collator = self.dataset_class, self.collator_class
        train = dataset(d.meta_path, chat.tokenizer, d, is_train=True, seed=seed)
        val = dataset(d.eval_meta_path, chat.tokenizer, d, is_train=False, seed=seed) if d.eval_meta_path else None
        pad_id = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else 0
        collate = collator(d.use_packed_ds, pad_id, chat.img_context_token_id, chat.num_image_token, d.loss_reduction)
        self.lengths = train.lengths
        self.train_set = train
        if d.use_packed_ds:
            sampler = PackedBatchSampler(train.lengths, d.max_packed_tokens, world_size, rank, grad_accum, seed,
                                         tiles=train.tiles, max_tiles=d.num_images_expected)
        else:
            sampler = GlobalBatchSampler(train.lengths, per_device_batch, world_size, rank, grad_accum, seed,
                                         d.group_by_length)
        return train, val, collate, sampler

    def tokens_per_micro_batch(self, per_device_batch: int) -> int:
        """LLM tokens of the largest micro-batch: the packing budget, or the longest sample times the batch size."""
        if self.data.use_packed_ds:
            return self.data.max_packed_tokens
        return per_device_batch * max(self.lengths)

    def memory_shape(self, per_device_batch: int) -> dict:
        """The shape the memory estimate needs (``train/memory.py``)."""
        d = self.data
        tiles = d.num_images_expected if d.use_packed_ds else \
            per_device_batch * (d.max_dynamic_patch + int(d.use_thumbnail)) if d.dynamic_image_size else per_device_batch
        return memory_shape(self.chat, self.tokens_per_micro_batch(per_device_batch), self.args.lora_dropout, tiles)

    def describe(self) -> list[str]:
        """The recipe's lines of the run plan: model, template and tiling."""
        d, chat = self.data, self.chat
        own = chat.template
        template = d.conv_style + ("" if d.conv_style == own else f" (the checkpoint says {own}: check --conv_style)")
        if d.system_message is not None:
            template += (" with InternVL3.5's thinking system prompt" if d.system_message == THINKING_SYSTEM_MESSAGE
                         else " with the checkpoint's system message")
        tiles = (f"dynamic tiles {d.min_dynamic_patch}-{d.max_dynamic_patch}"
                 + (" + thumbnail" if d.use_thumbnail else "") if d.dynamic_image_size else "one tile per image")
        parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.trainable_parts.items())
        quantized = ", LLM linear layers in 4 bits (NF4)" if self.args.load_in_4bit else ""
        if chat.mxfp4_dequantized:
            quantized += f", {chat.mxfp4_dequantized} MXFP4 expert tensors dequantized to bf16 on load"
        if chat.is_moe:
            experts, router = moe_modes(self.args)
            quantized += (f", experts {experts} (grouped), routers {router}, load-balancing loss x "
                          f"{aux_loss_coef(chat, self.args):g}")
        lines = [f"model: {self.args.model_name_or_path} ({chat.family}){quantized}, template {template}, "
                f"{d.force_image_size} px tiles x {d.num_image_token} tokens, {tiles}; trainable: {parts}"]
        return lines + self._lora_note()

    def _lora_note(self) -> list[str]:
        """A plan line when LLM LoRA also trains whole parts (the reference's defaults train the ViT and projector
        beside the adapters), since an adapter then holds those parts in full and vLLM's LoRA serving ignores them."""
        a = self.args
        parts = {"vision": "the ViT", "projector": "the projector (mlp1)", "lm_head": "the LM head"}
        if a.use_backbone_lora:  # the ViT trains through its own adapters
            del parts["vision"]
        full = [label for key, label in parts.items() if self.trainable_parts.get(key)]
        if not a.use_llm_lora or not full:
            return []
        return [f"note: besides the LLM's LoRA adapters, {', '.join(full)} train in full (the reference's defaults; "
                "--freeze_backbone True --freeze_mlp True train the adapters alone). The adapter keeps them whole "
                "(modules_to_save), which vLLM's LoRA serving ignores: serve the merged model (the run's output "
                "folder, or `internvl-tune merge-lora`)"]

    def checkpoint_saved(self, path: Path) -> None:
        """A LoRA run's ``checkpoint-N/adapter/`` (as the transformers Trainer writes an adapter into every checkpoint
        of a peft run), so peft, chat, merge-lora and convert take any checkpoint as they take the run's final
        ``adapter/``. Built from the checkpoint's own trained tensors on a weightless copy of the model: no base
        weight is read, and the adapter equals the one an export at that step writes."""
        from internvl_tune.models.common.checkpoint_files import read_trainable_params
        from internvl_tune.models.internvl_chat.lora import save_adapter

        m = self.args
        if not (m.use_llm_lora or m.use_backbone_lora):
            return
        _, params = read_trainable_params(path, check=False)  # (just written and hashed by the checkpointer)
        chat = self._load_chat(torch.float32, weights=False)
        apply_trainable_flags(chat, m)
        chat.model.load_state_dict({k.removeprefix("model."): v for k, v in params.items()}, strict=False, assign=True)
        save_adapter(chat, path / "adapter", base=m.model_name_or_path)

    def data_summary(self) -> dict:
        """The run report's data table (estimates, as ``data check`` prints them): samples per dataset and kind,
        tiles per sample, a histogram of tokens per sample."""
        from collections import Counter

        from internvl_tune.data.check import length_histogram
        from internvl_tune.data.meta import KINDS

        train = self.train_set
        names = [spec.name for spec, size in zip(train.specs, train.sizes) for _ in range(size)]
        datasets: dict[str, dict] = {}
        for name, kind in zip(names, train.kinds):
            row = datasets.setdefault(name, {"samples": 0, **dict.fromkeys(KINDS, 0)})
            row["samples"] += 1
            row[kind] = row.get(kind, 0) + 1
        return {"samples": len(train), "kinds": list(KINDS), "datasets": datasets,
                "tiles": {str(t): n for t, n in sorted(Counter(train.tiles).items())},
                "token_histogram": length_histogram([(n, 1) for n in train.lengths], self.data.max_seq_length),
                "max_seq_length": self.data.max_seq_length}

    def generate_eval(self, samples: int, max_new_tokens: int, rank: int, world_size: int, gather):
        """``--eval_generate``: answer ``samples`` validation samples (spread over the set) with the model in
        training and score them (``eval/chat``). Returns ``(overall means, rows)`` on rank 0, ``(None, [])``
        elsewhere. Every rank takes part: with several ranks each answers a shard in lockstep (the same number of
        ``generate`` steps everywhere, as the sharded model gathers its weights collectively).

        BLEU-4 / ROUGE-L / CIDEr are included when Java and pycocoevalcap are installed.
        """
        import importlib.util
        import shutil

        from internvl_tune.eval.chat.run import GenerationSettings, generate_answers, pick_samples, score_rows
        from internvl_tune.eval.chat.samples import GenerationDataset

        if self._generation_set is None:
            self._generation_set = GenerationDataset(self.data.eval_meta_path, self.chat.tokenizer, self.data,
                                                     strict=False)
        dataset = self._generation_set
        rows = generate_answers(self.chat, dataset, pick_samples(dataset, samples, spread=True),
                                GenerationSettings(max_new_tokens), rank=rank, world_size=world_size, gather=gather,
                                lockstep=world_size > 1, show_progress=False)
        if rank != 0:
            return None, []
        text = shutil.which("java") is not None and importlib.util.find_spec("pycocoevalcap") is not None
        return score_rows(rows, text_metrics=text)["overall"], rows

    def export(self, state: dict[str, torch.Tensor], output_dir: Path) -> None:
        """Write the final model into ``output_dir`` in the original InternVL layout (LoRA: adapter + merged).

        ``state`` is the gathered state dict of the training module; it is assigned into a fresh structure of the
        base model with the same trainable flags (built on the meta device: the checkpoint is not read again), so
        the exported files never depend on how training was sharded. Runs on rank 0 only.

        With ``--load_in_4bit`` only the trained tensors of ``state`` are used: folding LoRA into 4-bit weights
        would be lossy, so the final model is the base checkpoint, read again in bf16, with the adapter merged
        into it (the adapter alone needs no base weights).
        """
        from internvl_tune.models.internvl_chat.lora import has_lora, merge_lora, save_adapter

        m = self.args
        quantized = m.load_in_4bit
        base_needed = quantized and (m.merge_lora or not (m.use_llm_lora or m.use_backbone_lora))
        chat = self._load_chat(torch.bfloat16 if quantized else torch.float32, weights=base_needed)
        apply_trainable_flags(chat, m)
        own = {k.removeprefix("model."): v.float() if v.is_floating_point() else v for k, v in state.items()}
        if quantized:  # the frozen weights in `state` are 4-bit: they come from the checkpoint instead
            own = {name: own[name] for name, p in chat.model.named_parameters() if p.requires_grad}
        chat.model.load_state_dict(own, strict=not quantized, assign=True)
        chat.set_system_message(self.data.system_message)  # chat then prompts as training did
        if has_lora(chat):
            save_adapter(chat, output_dir / "adapter", base=m.model_name_or_path)
            if m.merge_lora:
                merge_lora(chat)
        if not has_lora(chat):
            if quantized:
                chat.model.to(torch.bfloat16)  # the trained tensors too: one dtype in the files
            _save_into(chat, output_dir)


def router_stats(chat):
    """A :class:`RouterStats` hooked to every router of a mixture-of-experts chat model."""
    from internvl_tune.models.common.moe import RouterStats
    from internvl_tune.models.internvl_chat import families

    moe, llm = families.get(chat.family).moe, chat.original_config["llm_config"]
    routers = [layer.get_submodule(moe.router) for layer in chat.model.model.language_model.layers
               if hasattr(layer.mlp, "experts")]
    return RouterStats(routers, llm[moe.num_experts_key], llm[moe.top_k_key])


def aux_loss_coef(chat, args: ModelArgs) -> float:
    """The load-balancing loss weight: ``--router_aux_loss_coef``, else the reference's (see its ``--help``)."""
    if args.router_aux_loss_coef is not None or not chat.is_moe:
        return args.router_aux_loss_coef or 0.0
    from internvl_tune.models.internvl_chat import families

    llm = chat.original_config["llm_config"]
    applied = families.get(chat.family).moe.aux_loss_always or llm.get("output_router_logits", False)
    return float(llm.get("router_aux_loss_coef", 0.0)) if applied else 0.0


def memory_shape(chat, tokens_per_micro_batch: int, lora_dropout: float, tiles_per_micro_batch: int) -> dict:
    """The LLM shape for ``train.memory.estimate_training_memory``: widths and depth, the input widths of one layer's
    LoRA linears when their dropout keeps copies of the inputs, and the ViT's shape and tokens when it trains."""
    from internvl_tune.models.common.lora import lora_modules

    model = chat.model
    text, vit = model.config.text_config, model.config.vision_config
    layer = model.model.language_model.layers[0]
    dropout_width = sum(m.in_features for _, m in lora_modules(layer)) if lora_dropout > 0 else 0
    vision = None
    if any(p.requires_grad for p in model.model.vision_tower.parameters()):
        side = chat.image_size // chat.patch_size
        vision = dict(hidden=vit.hidden_size, ffn=vit.intermediate_size, num_layers=vit.num_hidden_layers,
                      tokens=tiles_per_micro_batch * (side * side + 1))
    ffn, moe = text.intermediate_size, None
    if chat.is_moe:  # activations follow the experts a token runs through; all their weights are model states
        from internvl_tune.models.internvl_chat import families

        layout, llm = families.get(chat.family).moe, chat.original_config["llm_config"]
        moe = dict(top_k=llm[layout.top_k_key], experts=llm[layout.num_experts_key])
        ffn = moe["top_k"] * llm.get("moe_intermediate_size", text.intermediate_size)
    return dict(tokens_per_micro_batch=tokens_per_micro_batch, hidden=text.hidden_size, ffn=ffn,
                num_layers=text.num_hidden_layers, vocab=text.vocab_size, lora_dropout_width=dropout_width,
                vision=vision, moe=moe)


def _save_into(chat, output_dir: Path) -> None:
    """Save the model in its base's layout next to the run's logs and checkpoints (as the reference does): an
    original-layout base keeps its release files (remote code included) and so its servers; a native ("-hf") base
    gives a native folder, which vLLM, LMDeploy and transformers load without remote code.

    It is written to a temporary sibling first; files then move in one by one, weights before ``config.json``,
    so a crash never leaves a config that points at missing weights.
    """
    tmp = output_dir / ".final-model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    chat.save_pretrained(tmp, layout=chat.layout, overwrite=True)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, output_dir / f.name)
    tmp.rmdir()
