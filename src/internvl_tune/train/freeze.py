"""Which parameters of an InternVL2 chat model train: the reference's freeze / LoRA flags, applied by name.

Order (as the reference, except that ``unfreeze_lm_head`` is applied last so it really takes effect):
freeze_backbone -> freeze_llm -> backbone LoRA -> LLM LoRA -> freeze_mlp -> unfreeze_vit_layers -> unfreeze_lm_head.
"""

from __future__ import annotations

from torch import nn

from internvl_tune.train.config import ModelArgs


def _set(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def apply_trainable_flags(chat, args: ModelArgs) -> dict[str, int]:
    """Freeze / unfreeze / LoRA-wrap ``chat.model`` per ``args``.

    Args:
        chat: an ``InternVLChat`` (``.model`` is a transformers ``InternVLForConditionalGeneration``).
        args: the model section of the training config.

    Returns:
        Trainable parameter counts per part (``vision``, ``projector``, ``llm``, ``lm_head``), for the run log.
    """
    from internvl_tune.models.internvl_chat.lora import add_lora

    model = chat.model
    vision, projector = model.model.vision_tower, model.model.multi_modal_projector
    llm, lm_head = model.model.language_model, model.lm_head
    _set(model, True)
    if args.freeze_backbone:
        _set(vision, False)
    if args.freeze_llm:
        _set(llm, False)
        _set(lm_head, False)
    if args.use_backbone_lora or args.use_llm_lora:
        add_lora(chat, llm_rank=args.use_llm_lora, vision_rank=args.use_backbone_lora)
    if args.freeze_mlp:
        _set(projector, False)
    if args.unfreeze_vit_layers:
        for layer in vision.encoder.layer[args.unfreeze_vit_layers :]:
            _set(layer, True)
    if args.unfreeze_lm_head:
        _set(lm_head, True)
    return {
        name: sum(p.numel() for p in part.parameters() if p.requires_grad)
        for name, part in (("vision", vision), ("projector", projector), ("llm", llm), ("lm_head", lm_head))
    }
