"""State-dict keys: original InternVLChatModel <-> transformers' native InternVLForConditionalGeneration.

One table, read in both directions (``{n}`` = a layer index, ``{w}`` = a parameter leaf such as ``weight``/``bias``;
``LM`` = ``language_model.model``, native ``V`` = ``model.vision_tower``, native ``T`` = ``model.language_model``):

| original                                         | native                                                      |
|--------------------------------------------------|-------------------------------------------------------------|
| vision_model.embeddings.class_embedding          | V.embeddings.cls_token                                      |
| vision_model.embeddings.position_embedding       | V.embeddings.position_embeddings                            |
| vision_model.embeddings.patch_embedding.{w}      | V.embeddings.patch_embeddings.projection.{w}                |
| vision_model.encoder.layers.{n}.attn.qkv.{w}     | V.encoder.layer.{n}.attention.{q,k,v}_proj.{w} (thirds)     |
| vision_model.encoder.layers.{n}.attn.{q,k}_norm  | V.encoder.layer.{n}.attention.{q,k}_norm                    |
| vision_model.encoder.layers.{n}.attn.proj.{w}    | V.encoder.layer.{n}.attention.projection_layer.{w}          |
| vision_model.encoder.layers.{n}.mlp.fc{1,2}.{w}  | V.encoder.layer.{n}.mlp.fc{1,2}.{w}                         |
| vision_model.encoder.layers.{n}.norm{1,2}.{w}    | V.encoder.layer.{n}.layernorm_{before,after}.{w}            |
| vision_model.encoder.layers.{n}.ls{1,2}          | V.encoder.layer.{n}.lambda_{1,2}                            |
| mlp1.{0,1,3}.{w}                                 | model.multi_modal_projector.{layer_norm,linear_1,linear_2}.{w} |
| LM.* (Qwen2, Phi-3, Llama: same names)           | T.*                                                         |
| language_model.lm_head.weight                    | lm_head.weight                                              |
| InternLM2: LM.tok_embeddings.weight              | T.embed_tokens.weight                                       |
| InternLM2: LM.layers.{n}.attention.wqkv.{w}      | T.layers.{n}.self_attn.{q,k,v}_proj.{w} (grouped per KV head) |
| InternLM2: LM.layers.{n}.attention.wo.{w}        | T.layers.{n}.self_attn.o_proj.{w}                           |
| InternLM2: LM.layers.{n}.feed_forward.w{1,3,2}   | T.layers.{n}.mlp.{gate,up,down}_proj                        |
| InternLM2: LM.layers.{n}.{attention,ffn}_norm    | T.layers.{n}.{input,post_attention}_layernorm               |
| InternLM2: LM.norm.weight                        | T.norm.weight                                               |
| InternLM2: language_model.output.weight          | lm_head.weight                                              |

InternLM2's fused ``wqkv`` rows come in ``num_key_value_heads`` groups, each holding that group's query heads, then
one key head, then one value head (``head_dim`` rows each); a plain [q | k | v] split would be wrong.
Phi-3 keeps its fused ``qkv_proj`` / ``gate_up_proj``: the native Phi-3 has the same modules.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from internvl_tune.models.internvl_chat.config import family_of

V, T = "model.vision_tower.", "model.language_model."
_VIT, _LM = "vision_model.encoder.layers.{n}.", "language_model.model."
# (original, native) name templates; both directions are derived from this one table.
VISION_KEYS = [
    ("vision_model.embeddings.class_embedding", V + "embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", V + "embeddings.position_embeddings"),
    ("vision_model.embeddings.patch_embedding.{w}", V + "embeddings.patch_embeddings.projection.{w}"),
    (_VIT + "attn.q_norm.{w}", V + "encoder.layer.{n}.attention.q_norm.{w}"),
    (_VIT + "attn.k_norm.{w}", V + "encoder.layer.{n}.attention.k_norm.{w}"),
    (_VIT + "attn.proj.{w}", V + "encoder.layer.{n}.attention.projection_layer.{w}"),
    (_VIT + "mlp.fc1.{w}", V + "encoder.layer.{n}.mlp.fc1.{w}"),
    (_VIT + "mlp.fc2.{w}", V + "encoder.layer.{n}.mlp.fc2.{w}"),
    (_VIT + "norm1.{w}", V + "encoder.layer.{n}.layernorm_before.{w}"),
    (_VIT + "norm2.{w}", V + "encoder.layer.{n}.layernorm_after.{w}"),
    (_VIT + "ls1", V + "encoder.layer.{n}.lambda_1"),
    (_VIT + "ls2", V + "encoder.layer.{n}.lambda_2"),
    ("mlp1.0.{w}", "model.multi_modal_projector.layer_norm.{w}"),
    ("mlp1.1.{w}", "model.multi_modal_projector.linear_1.{w}"),
    ("mlp1.3.{w}", "model.multi_modal_projector.linear_2.{w}"),
]
HF_LLM_KEYS = [
    (_LM + "{rest}", T + "{rest}"),
    ("language_model.lm_head.weight", "lm_head.weight"),
]
INTERNLM2_KEYS = [
    (_LM + "tok_embeddings.weight", T + "embed_tokens.weight"),
    (_LM + "layers.{n}.attention.wo.{w}", T + "layers.{n}.self_attn.o_proj.{w}"),
    (_LM + "layers.{n}.feed_forward.w1.weight", T + "layers.{n}.mlp.gate_proj.weight"),
    (_LM + "layers.{n}.feed_forward.w3.weight", T + "layers.{n}.mlp.up_proj.weight"),
    (_LM + "layers.{n}.feed_forward.w2.weight", T + "layers.{n}.mlp.down_proj.weight"),
    (_LM + "layers.{n}.attention_norm.weight", T + "layers.{n}.input_layernorm.weight"),
    (_LM + "layers.{n}.ffn_norm.weight", T + "layers.{n}.post_attention_layernorm.weight"),
    (_LM + "norm.weight", T + "norm.weight"),
    ("language_model.output.weight", "lm_head.weight"),
]
# Fused q/k/v: (original template, native template with {p} = q|k|v)
VIT_QKV = (_VIT + "attn.qkv.{w}", V + "encoder.layer.{n}.attention.{p}_proj.{w}")
WQKV = (_LM + "layers.{n}.attention.wqkv.{w}", T + "layers.{n}.self_attn.{p}_proj.{w}")
# Older transformers (4.5x) saved native InternVL checkpoints with these prefixes; accepted on load.
LEGACY_NATIVE_PREFIXES = [
    ("language_model.model.", T),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", V),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]
_PLACEHOLDERS = {"n": r"(?P<n>\d+)", "w": r"(?P<w>\w+)", "p": r"(?P<p>[qkv])", "rest": r"(?P<rest>.+)"}


@functools.cache
def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern + "$")


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

    def table(self) -> list[tuple[str, str]]:
        """The plain renames of this family, as (original, native) templates."""
        return VISION_KEYS + (INTERNLM2_KEYS if self.family == "internlm2" else HF_LLM_KEYS)

    def fused(self) -> list[tuple[str, str]]:
        """The fused q/k/v entries of this family."""
        return [VIT_QKV, WQKV] if self.family == "internlm2" else [VIT_QKV]


def _rename(key: str, table: list[tuple[str, str]], reverse: bool) -> str | None:
    """Apply the first matching row of ``table`` (original -> native, or native -> original when ``reverse``)."""
    for original, native in table:
        source, target = (native, original) if reverse else (original, native)
        if m := _compile(source).match(key):
            return target.format(**m.groupdict())
    return None


def _split_wqkv(tensor: torch.Tensor, spec: LayoutSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2 wqkv rows [groups x (q_per_group + 2) x head_dim] -> q, k, v rows."""
    per_group = spec.num_heads // spec.num_kv_heads
    grouped = tensor.reshape(spec.num_kv_heads, per_group + 2, spec.head_dim, *tensor.shape[1:])
    q = grouped[:, :per_group].reshape(spec.num_heads * spec.head_dim, *tensor.shape[1:])
    k = grouped[:, per_group].reshape(spec.num_kv_heads * spec.head_dim, *tensor.shape[1:])
    v = grouped[:, per_group + 1].reshape(spec.num_kv_heads * spec.head_dim, *tensor.shape[1:])
    return q, k, v


def join_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: LayoutSpec) -> torch.Tensor:
    per_group = spec.num_heads // spec.num_kv_heads
    rest = q.shape[1:]
    q = q.reshape(spec.num_kv_heads, per_group, spec.head_dim, *rest)
    k = k.reshape(spec.num_kv_heads, 1, spec.head_dim, *rest)
    v = v.reshape(spec.num_kv_heads, 1, spec.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def original_name(key: str, spec: LayoutSpec) -> str | None:
    """The original name of a native key that is not part of a fused q/k/v (None when unknown)."""
    return _rename(key, spec.table(), reverse=True)


def convert_original_tensor(key: str, tensor: torch.Tensor, spec: LayoutSpec) -> list[tuple[str, torch.Tensor]] | None:
    """Native (key, tensor) pairs for one original tensor, or None when the key is unknown.

    Splits return views of ``tensor`` (no copy), so streaming a checkpoint never doubles its memory.
    """
    for original, native in spec.fused():
        if m := _compile(original).match(key):
            parts = _split_wqkv(tensor, spec) if original == WQKV[0] else tensor.chunk(3, dim=0)
            return [(native.format(p=p, **m.groupdict()), part) for p, part in zip("qkv", parts)]
    name = _rename(key, spec.table(), reverse=False)
    return None if name is None else [(name, tensor)]


def to_original(state: dict[str, torch.Tensor], spec: LayoutSpec) -> dict[str, torch.Tensor]:
    """Convert a native state dict to original keys (fusing ViT qkv and InternLM2 wqkv); unknown keys raise KeyError."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for original, native in spec.fused():
            if m := _compile(native).match(key):
                groups = m.groupdict()
                fused.setdefault((original, groups["n"], groups["w"]), {})[groups["p"]] = tensor
                break
        else:
            name = original_name(key, spec)
            if name is None:
                raise KeyError(key)
            out[name] = tensor
    for (original, layer, leaf), parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{original.format(n=layer, w=leaf)}: only {sorted(parts)} of q/k/v present")
        q, k, v = parts["q"], parts["k"], parts["v"]
        joined = join_wqkv(q, k, v, spec) if original == WQKV[0] else torch.cat([q, k, v])
        out[original.format(n=layer, w=leaf)] = joined
    return out


def normalize_native_key(key: str) -> str:
    """Map keys of native checkpoints saved by older transformers onto today's names."""
    for old, new in LEGACY_NATIVE_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key
