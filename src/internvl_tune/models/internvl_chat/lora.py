"""LoRA for InternVL2 chat models (peft), with the reference's target modules mapped to native names.

| part            | reference targets                                         | native targets                                   |
|-----------------|-----------------------------------------------------------|--------------------------------------------------|
| ViT             | attn.qkv, attn.proj, mlp.fc1, mlp.fc2                      | attention.{q,k,v}_proj, projection_layer, fc1, fc2 |
| InternLM2 LLM   | attention.wqkv, attention.wo, feed_forward.w1/w2/w3         | self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj |
| Phi-3 LLM       | self_attn.qkv_proj, o_proj, mlp.gate_up_proj, down_proj     | the same names                                   |
| Qwen2 / Llama   | self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj           | the same names                                   |

``lora_alpha = 2 * r`` and dropout 0.05, as the reference. Where the reference fuses q/k/v into one linear (InternViT
``qkv``, InternLM2 ``wqkv``) we put one adapter on each of q, k and v: the same rank per projection, not one shared
low-rank factor, so adapters are not interchangeable with reference ones for those modules (merged weights are).
Adapters are saved as ``adapter_model.safetensors`` + ``adapter_config.json``; the config records the base model
and its shapes so loading onto a different base fails with a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from internvl_tune.errors import CheckpointError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LORA_DROPOUT = 0.05
_VIT = r"model\.vision_tower\.encoder\.layer\.\d+\.(attention\.(q_proj|k_proj|v_proj|projection_layer)|mlp\.(fc1|fc2))"
_LLM = {
    "phi3": r"model\.language_model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))",
    "default": r"model\.language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
}


def _llm_pattern(family: str) -> str:
    return _LLM.get(family, _LLM["default"])


def fingerprint(chat) -> dict:
    """Shape facts of the base model an adapter belongs to."""
    text, vision = chat.model.config.text_config, chat.model.config.vision_config
    return {
        "family": chat.family,
        "llm_hidden_size": text.hidden_size,
        "llm_layers": text.num_hidden_layers,
        "vocab_size": chat.model.get_input_embeddings().weight.shape[0],
        "vit_hidden_size": vision.hidden_size,
        "vit_layers": vision.num_hidden_layers,
    }


def add_lora(chat, llm_rank: int = 0, vision_rank: int = 0) -> None:
    """Wrap the LLM (rank ``llm_rank``) and/or the ViT (rank ``vision_rank``) linears with LoRA, in place.

    Base weights are frozen; only the LoRA matrices train (other parts keep their ``requires_grad``).
    """
    from peft import LoraConfig, inject_adapter_in_model

    patterns, ranks, alphas = [], {}, {}
    if llm_rank:
        patterns.append(_llm_pattern(chat.family))
        ranks[_llm_pattern(chat.family)], alphas[_llm_pattern(chat.family)] = llm_rank, 2 * llm_rank
    if vision_rank:
        patterns.append(_VIT)
        ranks[_VIT], alphas[_VIT] = vision_rank, 2 * vision_rank
    if not patterns:
        return
    first = llm_rank or vision_rank
    config = LoraConfig(
        r=first, lora_alpha=2 * first, lora_dropout=LORA_DROPOUT, target_modules="^(" + "|".join(patterns) + ")$",
        rank_pattern=ranks, alpha_pattern=alphas,
    )
    inject_adapter_in_model(config, chat.model)
    chat.lora_config = {"llm_rank": llm_rank, "vision_rank": vision_rank}


def _lora_modules(model):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(chat) -> bool:
    """True when the model holds (unmerged) LoRA layers."""
    return bool(_lora_modules(chat.model))


def merge_lora(chat) -> None:
    """Fold every LoRA update into its base weight and put the plain linear layers back, in place."""
    for name, module in _lora_modules(chat.model):
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(chat.model.get_submodule(parent_name), child, module.get_base_layer())
    chat.lora_config = None


def save_adapter(chat, out_dir, base: str | Path | None = None) -> Path:
    """Write the LoRA weights and a config naming the base model into ``out_dir``."""
    from safetensors.torch import save_file

    ranks = getattr(chat, "lora_config", None)
    if not has_lora(chat) or not ranks:
        raise CheckpointError("the model has no LoRA adapter to save — train with --use_llm_lora / --use_backbone_lora")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in chat.model.state_dict().items() if "lora_" in k}
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base if base is not None else chat.source_dir),
        "base_model": fingerprint(chat),
        "lora_alpha_per_rank": 2,
        "lora_dropout": LORA_DROPOUT,
        **ranks,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_adapter(chat, adapter_dir) -> None:
    """Add LoRA layers to ``chat`` and load a saved adapter into them; the base must match the adapter's."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from internvl_tune.models.internvl_chat.config import read_json

    adapter_dir = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise CheckpointError(f"{adapter_dir}: not a complete LoRA adapter directory ({name} is missing) — pass the "
                                  "adapter directory a LoRA run wrote (adapter_config.json + adapter_model.safetensors)")
    config = read_json(adapter_dir / ADAPTER_CONFIG)
    expected, actual = config.get("base_model", {}), fingerprint(chat)
    wrong = {k: (v, actual.get(k)) for k, v in expected.items() if actual.get(k) != v}
    if wrong:
        details = ", ".join(f"{k}: adapter {a}, model {b}" for k, (a, b) in wrong.items())
        raise CheckpointError(
            f"{adapter_dir}: this adapter was trained on {config.get('base_model_name_or_path')!r}, which differs from "
            f"the base model given ({details}) — pass that base model"
        )
    was_training = chat.model.training
    add_lora(chat, llm_rank=config.get("llm_rank", 0), vision_rank=config.get("vision_rank", 0))
    chat.model.train(was_training)  # new LoRA dropout modules start in training mode
    try:
        weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    except SafetensorError as exc:
        raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS}: cannot read the adapter weights ({exc}) — the file is "
                              "truncated or corrupt; copy it again from the training run") from exc
    own = {k for k in chat.model.state_dict() if "lora_" in k}
    if set(weights) != own:
        missing, extra = sorted(own - set(weights)), sorted(set(weights) - own)
        raise CheckpointError(f"{adapter_dir}: adapter tensors do not match (missing {missing[:5]}, unexpected {extra[:5]})")
    device = chat.model.lm_head.weight.device
    with torch.no_grad():
        params = dict(chat.model.named_parameters())
        for key, value in weights.items():
            params[key].copy_(value.to(device))
