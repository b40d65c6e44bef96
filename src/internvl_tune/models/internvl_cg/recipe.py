"""The InternVL-C/G retrieval fine-tuning recipe (ITC + ITM on Flickr30K / Flickr30K-CN / COCO): full, head or LoRA.

What the one trainer (``train/trainer.py``) needs to know of this family:

- ``RetrievalModelArgs``: the model flags of the reference's ``internvl_stage2_finetune.py`` (data flags:
  ``data.retrieval.RetrievalDataArgs``);
- :func:`apply_trainable_flags`: freeze / unfreeze / LoRA in the reference's order;
- :class:`RetrievalTrainModule`: ``InternVLModel.retrieval_features`` -> ``loss.retrieval_loss``, each rank's rows
  contrasted against the embeddings gathered from every rank (gather-with-gradient, passed in by the trainer), so
  the loss and gradients equal those of one process holding the whole global batch. With gradient accumulation each
  micro-step is its own contrastive batch and the step's loss is the mean over micro-steps (as the reference);
- :class:`RetrievalRecipe`: module, data, parameter groups (layer-wise lr decay), export in the reference layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from internvl_tune.data.retrieval import RetrievalBatch, RetrievalDataArgs
from internvl_tune.errors import UserError
from internvl_tune.models.common.quantize import set_trainable
from internvl_tune.models.common.recipe import Recipe
from internvl_tune.models.internvl_cg.loss import retrieval_loss
from internvl_tune.options import option

LORA_DROPOUT = 0.05
# The reference's LoRA targets, as full-name patterns of InternVLModel (cross-attention projections are not targets).
VIT_LORA = r"vision_model\.encoder\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
QLLAMA_LORA = r"qllama\.model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|down_proj|up_proj))"
FEATURE_KEYS = ("pixel_values", "negative_input_ids", "negative_attention_mask", "positive_input_ids",
                "positive_attention_mask", "summarize_input_ids", "summarize_attention_mask")
# Reference flags of retrieval fine-tuning accepted and ignored (listed in --help; the trainer's own are in
# train/config.py).
IGNORED_FLAGS = {
    "--evaluation_strategy": "evaluate checkpoints with `internvl-tune eval retrieval`",
    "--optim": "always torch AdamW (the reference scripts pass adamw_torch)",
    "--pad_to_max_length": "captions are always padded to --max_seq_length (the reference scripts pass True)",
    "--dataloader_pin_memory": "memory is pinned when training on GPUs",
}


@dataclass
class RetrievalModelArgs:
    """Model flags of InternVL-C/G fine-tuning (the reference's ``ModelArguments``)."""

    model_name_or_path: str | None = option(None, "InternVL-14B checkpoint directory, e.g. "
                                                  "./pretrained/InternVL-14B-224px")
    freeze_model: bool = option(False, "freeze every parameter (then unfreeze parts with the flags below)")
    freeze_vision_model: bool = option(False, "freeze InternViT-6B")
    freeze_qllama: bool = option(False, "freeze QLLaMA")
    unfreeze_qllama_head: bool = option(False, "train text_projection and qllama.lm_head (tied to the input "
                                               "embeddings, so those train too: the reference's 'head' recipe)")
    unfreeze_crossattn: bool = option(False, "train QLLaMA's cross-attention layers")
    use_backbone_lora: int = option(0, "LoRA rank on the ViT's attn.qkv/attn.proj/mlp.fc1/mlp.fc2 (0 = off); "
                                       "alpha = 2 x rank")
    use_qllama_lora: int = option(0, "LoRA rank on QLLaMA's q/k/v/o and gate/up/down projections (0 = off); alpha "
                                     "= 2 x use_backbone_lora, as the reference")
    use_custom_trainer: bool = option(False, "layer-wise lr decay (the reference's custom trainer)")
    vit_layer_decay_rate: float = option(1.0, "ViT lr decay per layer with --use_custom_trainer (environment "
                                              "variable VIT_LAYER_DECAY_RATE)")
    qllama_layer_decay_rate: float = option(1.0, "QLLaMA lr decay per layer with --use_custom_trainer (environment "
                                                 "variable QLLAMA_LAYER_DECAY_RATE)")
    drop_path_rate: float = option(0.0, "ViT stochastic depth (linear over layers)")
    grad_checkpoint: str = option("True", "activation checkpointing of the ViT and QLLaMA layers: True (all; always "
                                          "on in the reference), False, a fraction such as 0.5, selective, or auto (all "
                                          "of them: this model has no memory estimate)")


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
    set_trainable(model, True)
    if args.freeze_model:
        set_trainable(model, False)
    if args.freeze_vision_model:
        set_trainable(model.vision_model, False)
    if args.freeze_qllama:
        set_trainable(model.qllama, False)
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


class RetrievalTrainModule(nn.Module):
    """Wraps an ``InternVLModel`` so FSDP2 has one root; ``forward(batch)`` returns the micro-batch's loss terms."""

    def __init__(self, model: nn.Module, gather_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model  # the only child: parameter names are "model." + the checkpoint's keys
        self.gather_fn = gather_fn
        # FSDP2 cannot shard 0-D parameters: logit_scale trains as a [1] tensor (same value; the loss broadcasts
        # it) and goes back to its checkpoint shape [] on export (see `checkpoint_state`).
        for name, p in list(model.named_parameters()):
            if p.ndim == 0:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, nn.Parameter(p.detach().reshape(1), p.requires_grad))

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, ViT first: the units of checkpointing, compilation and sharding."""
        return [*self.model.vision_model.encoder.layers, *self.model.qllama.model.layers]

    def forward(self, batch: RetrievalBatch) -> dict[str, torch.Tensor]:
        feats = self.model.retrieval_features(**{k: getattr(batch, k) for k in FEATURE_KEYS})
        return retrieval_loss(feats["itm_logits"], feats["image_itc"], feats["text_itc"], feats["backbone"],
                              feats["logit_scale"], batch.image_ids, gather_fn=self.gather_fn)


def checkpoint_state(full: dict[str, torch.Tensor], reference: nn.Module) -> dict[str, torch.Tensor]:
    """A gathered state dict of :class:`RetrievalTrainModule` as the state dict of ``reference`` (an
    ``InternVLModel``): the ``model.`` prefix dropped, 0-D parameters back in their checkpoint shape."""
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    out = {}
    for key, value in full.items():
        key = key.removeprefix("model.")
        out[key] = value.reshape(shapes[key]) if key in shapes else value
    return out


class RetrievalRecipe(Recipe):
    """InternVL-C/G retrieval fine-tuning for ``train/trainer.py`` (the ``Recipe`` protocol, ``models/common/recipe.py``)."""

    name, unit = "retrieval-train", "samples"

    def __init__(self, model: RetrievalModelArgs, data: RetrievalDataArgs,
                 gather_fn: Callable[[torch.Tensor], torch.Tensor]):
        if not model.model_name_or_path:
            raise UserError("--model_name_or_path is required (e.g. ./pretrained/InternVL-14B-224px)")
        if data.force_image_size is None:  # the checkpoint's resolution, from its config.json alone
            from internvl_tune.models.internvl_cg.config import InternVLCGConfig

            own = InternVLCGConfig.from_file(Path(model.model_name_or_path) / "config.json").image_size
            data = dataclasses.replace(data, force_image_size=own)
        self.args, self.data, self.gather_fn = model, data, gather_fn
        self.trainable_parts: dict[str, int] = {}
        self.config = None

    def _load(self, dtype: torch.dtype, weights: bool = True):
        from internvl_tune.models.internvl_cg.loading import load_internvl_cg

        m = self.args
        return load_internvl_cg(m.model_name_or_path, dtype=dtype, force_image_size=self.data.force_image_size,
                                drop_path_rate=m.drop_path_rate, weights=weights)

    def build_module(self, dtype: torch.dtype, weights: bool = True, device="cpu") -> RetrievalTrainModule:
        """The training module from the checkpoint, trainable flags and LoRA applied, on the CPU (whatever
        ``device``: the trainer moves it)."""
        m = self.args
        self.load_dtype = dtype
        model = self._load(dtype, weights)
        if model.config.image_size != self.data.force_image_size:
            raise UserError(f"{m.model_name_or_path} runs at {model.config.image_size} px (its config's "
                            f"force_image_size); pass --force_image_size {model.config.image_size}")
        self.trainable_parts = apply_trainable_flags(model, m)
        self.config = model.config
        return RetrievalTrainModule(model, self.gather_fn)

    @property
    def grad_checkpoint(self) -> str:
        return self.args.grad_checkpoint

    def build_data(self, seed: int, rank: int, world_size: int, per_device_batch: int, grad_accum: int):
        """``(train_set, None, collate, sampler)``: retrieval fine-tuning has no validation loss."""
        from internvl_tune.data.batching import GlobalBatchSampler
        from internvl_tune.data.retrieval import build_train_dataset
        from internvl_tune.models.internvl_cg.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.args.model_name_or_path, add_eos_token=True)
        train = build_train_dataset(self.data, tokenizer, seed)
        # every sample has the same shape, so length grouping has nothing to gain
        sampler = GlobalBatchSampler([1] * len(train), per_device_batch, world_size, rank, grad_accum, seed,
                                     group_by_length=False)
        self.train_size = (len(train), len({p[2] for p in train.pairs}))
        return train, None, RetrievalBatch.collate, sampler

    def data_summary(self) -> dict:
        """The run report's data table: (image, caption) pairs and images of the training set."""
        pairs, images = self.train_size
        return {"samples": pairs, "kinds": ["images"], "datasets": {self.data.dataset_name: {"samples": pairs,
                                                                                            "images": images}}}

    def param_groups_scale(self) -> Callable[[str], tuple[str, float]] | None:
        """Layer-wise lr decay with ``--use_custom_trainer`` (the reference's custom trainer), else None."""
        from internvl_tune.models.internvl_cg.layer_decay import layer_decay_lr_scale

        m, c = self.args, self.config
        if not m.use_custom_trainer:
            return None
        return layer_decay_lr_scale(c.vision_config.num_hidden_layers, c.qllama_config.num_hidden_layers,
                                    m.vit_layer_decay_rate, m.qllama_layer_decay_rate, prefix="model.")

    def describe(self) -> list[str]:
        m = self.args
        decay = (f"; layer-wise lr decay vit {m.vit_layer_decay_rate} / qllama {m.qllama_layer_decay_rate}"
                 if m.use_custom_trainer else "")
        parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.trainable_parts.items())
        lines = [f"model: {m.model_name_or_path} at {self.config.image_size} px, trainable: {parts}{decay}",
                 f"data: {self.data.dataset_name}"]
        if m.use_qllama_lora and not m.use_backbone_lora:
            lines.append("warning: --use_qllama_lora without --use_backbone_lora gets lora_alpha 0 (the reference "
                         "takes alpha from the backbone rank), so the QLLaMA adapter learns nothing")
        return lines

    def memory_shape(self, per_device_batch: int) -> None:
        return None

    def export(self, state: dict[str, torch.Tensor], output_dir: Path) -> None:
        """Write the final model into ``output_dir`` in the reference layout (LoRA merged), with the tokenizer.

        The gathered state is loaded into a fresh structure of the base model with the same trainable flags (so LoRA
        layers exist to receive the adapters), merged and saved; ``internvl-tune eval retrieval
        --model_name_or_path OUTPUT_DIR`` and the reference's loaders read it directly. Runs on rank 0 only.
        """
        from internvl_tune.models.common.lora import merge_lora_layers
        from internvl_tune.models.internvl_cg.loading import save_internvl_cg

        fresh = self._load(self.load_dtype, weights=False)  # the structure only: every tensor comes from `state`
        apply_trainable_flags(fresh, self.args)
        fresh.load_state_dict(checkpoint_state(state, fresh), strict=True, assign=True)
        merge_lora_layers(fresh)
        save_internvl_cg(fresh.to(self.load_dtype), output_dir, tokenizer_dir=self.args.model_name_or_path)
