"""Layer-wise learning-rate decay for InternVL-C/G, the rule of the reference's custom trainer.

Each trainable parameter gets a class (``vit`` or ``qllama``) and a layer id; its lr is
``lr * min(1, rate ** (L - layer_id - 1))`` with ``L = layers + 2`` and the class's own rate. Layer ids:

==========================================================  ===========  =========
parameter                                                   class        layer id
==========================================================  ===========  =========
``query_tokens``, ``logit_scale``                           qllama       0
``vision_model.*embeddings.*``                              vit          0
``vision_model.*layers.K.*``                                vit          K + 1
``clip_projector.*``                                        vit          vit_L
``qllama.*embed_tokens*`` (also the tied lm_head)            qllama       0
``qllama.*layers.K.*``                                      qllama       K + 1
other ``qllama.*`` (final norm, lm_head)                    qllama       q_L
``clip_projector2.*``, ``itm_head.*``, ``text_projection``  qllama       q_L
==========================================================  ===========  =========

So the last ViT layer runs at ``rate * lr``, the first at ``rate ** n * lr``, and the heads at the full lr. Names may
carry LoRA parts (``...layers.3.attn.qkv.lora_A.default.weight``: layer 4) or a wrapper prefix (stripped by the
caller through ``prefix``). Groups are tagged ``{class}_layer_{id}``; ``build_param_groups`` appends
``_decay`` / ``_no_decay``, which gives the reference's group names.
"""

from __future__ import annotations

from collections.abc import Callable


def _layer_index(name: str) -> int:
    return int(name.split("layers.")[-1].split(".")[0])


def layer_id(name: str, vit_max: int, qllama_max: int) -> int:
    """The reference's layer id of parameter ``name`` (an ``InternVLModel`` parameter name)."""
    if name in ("query_tokens", "logit_scale"):
        return 0
    if name.startswith("clip_projector."):
        return vit_max
    if name.startswith(("clip_projector2.", "itm_head.")) or name == "text_projection":
        return qllama_max
    if name.startswith("vision_model."):
        if "embeddings." in name:
            return 0
        if "layers." in name:
            return _layer_index(name) + 1
    if name.startswith("qllama."):
        if "embed_tokens" in name:
            return 0
        if "layers." in name:
            return _layer_index(name) + 1
        return qllama_max
    return 0


def param_class(name: str) -> str:
    """``vit`` for the ViT and its pooling head, ``qllama`` for the rest of the model, ``other`` otherwise."""
    if name in ("query_tokens", "text_projection", "logit_scale"):
        return "qllama"
    if name.startswith(("vision_model.", "clip_projector.")):
        return "vit"
    if name.startswith(("qllama.", "clip_projector2.", "itm_head.")):
        return "qllama"
    return "other"


def layer_decay_lr_scale(
    vit_layers: int,
    qllama_layers: int,
    vit_rate: float,
    qllama_rate: float,
    prefix: str = "",
) -> Callable[[str], tuple[str, float]]:
    """The ``lr_scale`` callable for :func:`internvl_tune.train.optim.build_param_groups`.

    Args:
        vit_layers / qllama_layers: ``num_hidden_layers`` of the vision and QLLaMA configs.
        vit_rate / qllama_rate: decay per layer (1.0 = off).
        prefix: wrapper prefix to strip from parameter names (e.g. ``"model."``).

    Returns:
        ``name -> ("{class}_layer_{id}", scale)``.
    """
    vit_max, qllama_max = vit_layers + 2, qllama_layers + 2

    def scale_of(full_name: str) -> tuple[str, float]:
        name = full_name.removeprefix(prefix)
        cls, lid = param_class(name), layer_id(name, vit_max, qllama_max)
        # the reference gives "other" parameters the QLLaMA rate (its else branch); none exist in InternVL-14B
        top, rate = (vit_max, vit_rate) if cls == "vit" else (qllama_max, qllama_rate)
        return f"{cls}_layer_{lid}", min(1.0, rate ** (top - lid - 1))

    return scale_of
