"""State-dict keys: original InternVLChatModel <-> transformers' native InternVLForConditionalGeneration.

Key table (``N`` = layer index; ``LM`` = ``language_model.model``; native ``V`` = ``model.vision_tower``,
native ``T`` = ``model.language_model``):

| original                                         | native                                                      |
|--------------------------------------------------|-------------------------------------------------------------|
| vision_model.embeddings.class_embedding          | V.embeddings.cls_token                                      |
| vision_model.embeddings.position_embedding       | V.embeddings.position_embeddings                            |
| vision_model.embeddings.patch_embedding.*        | V.embeddings.patch_embeddings.projection.*                  |
| vision_model.encoder.layers.N.attn.qkv.*         | V.encoder.layer.N.attention.{q,k,v}_proj.* (split in thirds) |
| vision_model.encoder.layers.N.attn.{q,k}_norm.*  | V.encoder.layer.N.attention.{q,k}_norm.*                    |
| vision_model.encoder.layers.N.attn.proj.*        | V.encoder.layer.N.attention.projection_layer.*              |
| vision_model.encoder.layers.N.mlp.fc{1,2}.*      | V.encoder.layer.N.mlp.fc{1,2}.*                             |
| vision_model.encoder.layers.N.norm{1,2}.*        | V.encoder.layer.N.layernorm_{before,after}.*                |
| vision_model.encoder.layers.N.ls{1,2}            | V.encoder.layer.N.lambda_{1,2}                              |
| mlp1.{0,1,3}.*                                   | model.multi_modal_projector.{layer_norm,linear_1,linear_2}.* |
| LM.* (Qwen2, Phi-3, Llama: same names)           | T.*                                                         |
| language_model.lm_head.weight                    | lm_head.weight                                              |
| InternLM2: LM.tok_embeddings.weight              | T.embed_tokens.weight                                       |
| InternLM2: LM.layers.N.attention.wqkv.*          | T.layers.N.self_attn.{q,k,v}_proj.* (grouped per KV head)   |
| InternLM2: LM.layers.N.attention.wo.*            | T.layers.N.self_attn.o_proj.*                               |
| InternLM2: LM.layers.N.feed_forward.w{1,3,2}.*   | T.layers.N.mlp.{gate,up,down}_proj.*                        |
| InternLM2: LM.layers.N.{attention,ffn}_norm.*    | T.layers.N.{input,post_attention}_layernorm.*               |
| InternLM2: LM.norm.weight                        | T.norm.weight                                               |
| InternLM2: language_model.output.weight          | lm_head.weight                                              |

InternLM2's fused ``wqkv`` rows come in ``num_key_value_heads`` groups, each holding that group's query heads, then
one key head, then one value head (``head_dim`` rows each); a plain [q | k | v] split would be wrong.
Phi-3 keeps its fused ``qkv_proj`` / ``gate_up_proj``: the native Phi-3 has the same modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from internvl_tune.models.internvl_chat.config import family_of

V, T = "model.vision_tower.", "model.language_model."
# Plain renames (regex on the original key -> native template), applied in order, first match wins.
_VISION_RENAMES = [
    (r"vision_model\.embeddings\.class_embedding$", V + "embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding$", V + "embeddings.position_embeddings"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)$", V + r"embeddings.patch_embeddings.projection.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.(weight|bias)$", V + r"encoder.layer.\1.attention.\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)$", V + r"encoder.layer.\1.attention.projection_layer.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", V + r"encoder.layer.\1.mlp.\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)$", V + r"encoder.layer.\1.layernorm_before.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)$", V + r"encoder.layer.\1.layernorm_after.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls1$", V + r"encoder.layer.\1.lambda_1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls2$", V + r"encoder.layer.\1.lambda_2"),
    (r"mlp1\.0\.(weight|bias)$", r"model.multi_modal_projector.layer_norm.\1"),
    (r"mlp1\.1\.(weight|bias)$", r"model.multi_modal_projector.linear_1.\1"),
    (r"mlp1\.3\.(weight|bias)$", r"model.multi_modal_projector.linear_2.\1"),
]
_HF_LLM_RENAMES = [
    (r"language_model\.model\.(.+)$", T + r"\1"),
    (r"language_model\.lm_head\.weight$", "lm_head.weight"),
]
_INTERNLM2_RENAMES = [
    (r"language_model\.model\.tok_embeddings\.weight$", T + "embed_tokens.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wo\.(weight|bias)$", T + r"layers.\1.self_attn.o_proj.\2"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w1\.weight$", T + r"layers.\1.mlp.gate_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w3\.weight$", T + r"layers.\1.mlp.up_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w2\.weight$", T + r"layers.\1.mlp.down_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention_norm\.weight$", T + r"layers.\1.input_layernorm.weight"),
    (r"language_model\.model\.layers\.(\d+)\.ffn_norm\.weight$", T + r"layers.\1.post_attention_layernorm.weight"),
    (r"language_model\.model\.norm\.weight$", T + "norm.weight"),
    (r"language_model\.output\.weight$", "lm_head.weight"),
]
_VIT_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
_WQKV = re.compile(r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)$")
# Older transformers (4.5x) saved native InternVL checkpoints with these prefixes; accepted on load.
LEGACY_NATIVE_PREFIXES = [
    ("language_model.model.", T),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", V),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]


@dataclass(frozen=True)
class LayoutSpec:
    """The few shape facts the key map needs (from the original config)."""

    family: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_original(cls, original: dict) -> "LayoutSpec":
        llm = original["llm_config"]
        heads = llm["num_attention_heads"]
        return cls(
            family=family_of(original),
            num_heads=heads,
            num_kv_heads=llm.get("num_key_value_heads") or heads,
            head_dim=llm.get("head_dim") or llm["hidden_size"] // heads,
        )


def _renames(spec: LayoutSpec):
    return _VISION_RENAMES + (_INTERNLM2_RENAMES if spec.family == "internlm2" else _HF_LLM_RENAMES)


def _split_wqkv(tensor: torch.Tensor, spec: LayoutSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2 wqkv rows [groups x (q_per_group + 2) x head_dim] -> q, k, v rows."""
    per_group = spec.num_heads // spec.num_kv_heads
    grouped = tensor.reshape(spec.num_kv_heads, per_group + 2, spec.head_dim, *tensor.shape[1:])
    q = grouped[:, :per_group].reshape(spec.num_heads * spec.head_dim, *tensor.shape[1:])
    k = grouped[:, per_group].reshape(spec.num_kv_heads * spec.head_dim, *tensor.shape[1:])
    v = grouped[:, per_group + 1].reshape(spec.num_kv_heads * spec.head_dim, *tensor.shape[1:])
    return q, k, v


def _join_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: LayoutSpec) -> torch.Tensor:
    per_group = spec.num_heads // spec.num_kv_heads
    rest = q.shape[1:]
    q = q.reshape(spec.num_kv_heads, per_group, spec.head_dim, *rest)
    k = k.reshape(spec.num_kv_heads, 1, spec.head_dim, *rest)
    v = v.reshape(spec.num_kv_heads, 1, spec.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def convert_original_tensor(key: str, tensor: torch.Tensor, spec: LayoutSpec) -> list[tuple[str, torch.Tensor]] | None:
    """Native (key, tensor) pairs for one original tensor, or None when the key is unknown.

    Splits return views of ``tensor`` (no copy), so streaming a checkpoint never doubles its memory.
    """
    if m := _VIT_QKV.match(key):
        layer, kind = m.groups()
        parts = tensor.chunk(3, dim=0)
        return [(f"{V}encoder.layer.{layer}.attention.{n}_proj.{kind}", p) for n, p in zip("qkv", parts)]
    if spec.family == "internlm2" and (m := _WQKV.match(key)):
        layer, kind = m.groups()
        parts = _split_wqkv(tensor, spec)
        return [(f"{T}layers.{layer}.self_attn.{n}_proj.{kind}", p) for n, p in zip("qkv", parts)]
    for pattern, template in _renames(spec):
        if re.match(pattern, key):
            return [(re.sub(pattern, template, key), tensor)]
    return None


def from_original(state: dict[str, torch.Tensor], spec: LayoutSpec) -> dict[str, torch.Tensor]:
    """Convert a whole original state dict to native keys; unknown keys raise KeyError."""
    out = {}
    for key, tensor in state.items():
        converted = convert_original_tensor(key, tensor, spec)
        if converted is None:
            raise KeyError(key)
        out.update(converted)
    return out


def _native_to_original_name(key: str, spec: LayoutSpec) -> str | None:
    """Inverse of the plain renames (qkv fusions are handled by ``to_original``)."""
    inverse = {
        V + "embeddings.cls_token": "vision_model.embeddings.class_embedding",
        V + "embeddings.position_embeddings": "vision_model.embeddings.position_embedding",
    }
    if key in inverse:
        return inverse[key]
    rules = [
        (re.escape(V) + r"embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"vision_model.embeddings.patch_embedding.\1"),
        (re.escape(V) + r"encoder\.layer\.(\d+)\.attention\.(q_norm|k_norm)\.(\w+)$", r"vision_model.encoder.layers.\1.attn.\2.\3"),
        (re.escape(V) + r"encoder\.layer\.(\d+)\.attention\.projection_layer\.(\w+)$", r"vision_model.encoder.layers.\1.attn.proj.\2"),
        (re.escape(V) + r"encoder\.layer\.(\d+)\.mlp\.(fc1|fc2)\.(\w+)$", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
        (re.escape(V) + r"encoder\.layer\.(\d+)\.layernorm_before\.(\w+)$", r"vision_model.encoder.layers.\1.norm1.\2"),
        (re.escape(V) + r"encoder\.layer\.(\d+)\.layernorm_after\.(\w+)$", r"vision_model.encoder.layers.\1.norm2.\2"),
        (re.escape(V) + r"encoder\.layer\.(\d+)\.lambda_1$", r"vision_model.encoder.layers.\1.ls1"),
        (re.escape(V) + r"encoder\.layer\.(\d+)\.lambda_2$", r"vision_model.encoder.layers.\1.ls2"),
        (r"model\.multi_modal_projector\.layer_norm\.(\w+)$", r"mlp1.0.\1"),
        (r"model\.multi_modal_projector\.linear_1\.(\w+)$", r"mlp1.1.\1"),
        (r"model\.multi_modal_projector\.linear_2\.(\w+)$", r"mlp1.3.\1"),
    ]
    if spec.family == "internlm2":
        rules += [
            (re.escape(T) + r"embed_tokens\.weight$", "language_model.model.tok_embeddings.weight"),
            (re.escape(T) + r"layers\.(\d+)\.self_attn\.o_proj\.(\w+)$", r"language_model.model.layers.\1.attention.wo.\2"),
            (re.escape(T) + r"layers\.(\d+)\.mlp\.gate_proj\.weight$", r"language_model.model.layers.\1.feed_forward.w1.weight"),
            (re.escape(T) + r"layers\.(\d+)\.mlp\.up_proj\.weight$", r"language_model.model.layers.\1.feed_forward.w3.weight"),
            (re.escape(T) + r"layers\.(\d+)\.mlp\.down_proj\.weight$", r"language_model.model.layers.\1.feed_forward.w2.weight"),
            (re.escape(T) + r"layers\.(\d+)\.input_layernorm\.weight$", r"language_model.model.layers.\1.attention_norm.weight"),
            (re.escape(T) + r"layers\.(\d+)\.post_attention_layernorm\.weight$", r"language_model.model.layers.\1.ffn_norm.weight"),
            (re.escape(T) + r"norm\.weight$", "language_model.model.norm.weight"),
            (r"lm_head\.weight$", "language_model.output.weight"),
        ]
    else:
        rules += [(re.escape(T) + r"(.+)$", r"language_model.model.\1"), (r"lm_head\.weight$", "language_model.lm_head.weight")]
    for pattern, template in rules:
        if re.match(pattern, key):
            return re.sub(pattern, template, key)
    return None


_NATIVE_VIT_QKV = re.compile(re.escape(V) + r"encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
_NATIVE_LLM_QKV = re.compile(re.escape(T) + r"layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def to_original(state: dict[str, torch.Tensor], spec: LayoutSpec) -> dict[str, torch.Tensor]:
    """Convert a native state dict to original keys (fusing ViT qkv and InternLM2 wqkv); unknown keys raise KeyError."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if m := _NATIVE_VIT_QKV.match(key):
            fused.setdefault(("vit", m.group(1), m.group(3)), {})[m.group(2)] = tensor
        elif spec.family == "internlm2" and (m := _NATIVE_LLM_QKV.match(key)):
            fused.setdefault(("llm", m.group(1), m.group(3)), {})[m.group(2)] = tensor
        else:
            name = _native_to_original_name(key, spec)
            if name is None:
                raise KeyError(key)
            out[name] = tensor
    for (where, layer, kind), parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{where} layer {layer} {kind}: only {sorted(parts)} of q/k/v present")
        if where == "vit":
            out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            out[f"language_model.model.layers.{layer}.attention.wqkv.{kind}"] = _join_wqkv(parts["q"], parts["k"], parts["v"], spec)
    return out


def normalize_native_key(key: str) -> str:
    """Map keys of native checkpoints saved by older transformers onto today's names."""
    for old, new in LEGACY_NATIVE_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key
