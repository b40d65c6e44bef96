"""State-dict keys: original InternVLChatModel <-> transformers' native InternVLForConditionalGeneration.

One table, read in both directions (``{n}`` = a layer index, ``{w}`` = a parameter leaf such as ``weight``/``bias``;
native ``V`` = ``model.vision_tower``): the vision and projector rows below, then the LLM rows of the checkpoint's
family (``families.Family.key_rows``: ``language_model.model.*`` <-> ``model.language_model.*`` for every family
but InternLM2, whose names differ).

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

A family's fused q/k/v (``Family.fused_qkv``: InternLM2's ``wqkv``) is split on load and joined on save; grouped rows
come in ``num_key_value_heads`` groups, each holding that group's query heads, then one key head, then one value head
(``head_dim`` rows each), so a plain [q | k | v] split would be wrong. Phi-3 keeps its fused ``qkv_proj`` /
``gate_up_proj``: the native Phi-3 has the same modules.

Mixture-of-experts families (``families.MoeLayout``): transformers 5 holds a layer's experts as grouped tensors
(``mlp.experts.gate_up_proj`` [E, ...]); where the files hold one tensor per expert (Qwen3-MoE's
``mlp.experts.{e}.{gate,up,down}_proj.weight``, in both layouts), each of them is one :class:`ExpertSlot` of the
grouped parameter on load and a view of it on save. GPT-OSS's files hold the grouped tensors themselves.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from internvl_tune.models.internvl_chat import families
from internvl_tune.models.internvl_chat.config import family_of
from internvl_tune.models.internvl_chat.families import FusedQKV, T

_LAYER = T + "layers.{n}."

V = "model.vision_tower."
_VIT = "vision_model.encoder.layers.{n}."
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
# Fused q/k/v of the ViT: plain thirds (the LLM's, if any, is its family's ``fused_qkv``).
VIT_QKV = FusedQKV(_VIT + "attn.qkv.{w}", V + "encoder.layer.{n}.attention.{p}_proj.{w}", grouped=False)
# Older transformers (4.5x) saved native InternVL checkpoints with these prefixes; accepted on load.
LEGACY_NATIVE_PREFIXES = [
    ("language_model.model.", T),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", V),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]
_PLACEHOLDERS = {"n": r"(?P<n>\d+)", "w": r"(?P<w>\w+)", "p": r"(?P<p>[qkv])", "rest": r"(?P<rest>.+)",
                 "e": r"(?P<e>\d+)"}


@functools.cache
def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern + "$")


@dataclass(frozen=True)
class LayoutSpec:
    """The few shape facts the key map needs (from the original config); ``family`` is the family's name."""

    family: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_original(cls, original: dict) -> "LayoutSpec":
        llm = original["llm_config"]
        heads = llm["num_attention_heads"]
        return cls(
            family=family_of(original).name,
            num_heads=heads,
            num_kv_heads=llm.get("num_key_value_heads") or heads,
            head_dim=llm.get("head_dim") or llm["hidden_size"] // heads,
        )

    def table(self) -> list[tuple[str, str]]:
        """The plain renames of this family, as (original, native) templates."""
        return VISION_KEYS + list(families.get(self.family).key_rows)

    def fused(self) -> list[FusedQKV]:
        """The fused q/k/v linears of this family (the ViT's, then the LLM's if it has one)."""
        llm = families.get(self.family).fused_qkv
        return [VIT_QKV] if llm is None else [VIT_QKV, llm]


def _rename(key: str, table: list[tuple[str, str]], reverse: bool) -> str | None:
    """Apply the first matching row of ``table`` (original -> native, or native -> original when ``reverse``)."""
    for original, native in table:
        source, target = (native, original) if reverse else (original, native)
        if m := _compile(source).match(key):
            return target.format(**m.groupdict())
    return None


def _split_wqkv(tensor: torch.Tensor, spec: LayoutSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped q/k/v rows (InternLM2's wqkv) [groups x (q_per_group + 2) x head_dim] -> q, k, v rows."""
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
    for fused in spec.fused():
        if m := _compile(fused.original).match(key):
            parts = _split_wqkv(tensor, spec) if fused.grouped else tensor.chunk(3, dim=0)
            return [(fused.native.format(p=p, **m.groupdict()), part) for p, part in zip("qkv", parts)]
    name = _rename(key, spec.table(), reverse=False)
    return None if name is None else [(name, tensor)]


def fused_part(key: str, spec: LayoutSpec) -> tuple[FusedQKV, str, str] | None:
    """``(fused linear, its original key, "q" | "k" | "v")`` when the native ``key`` is one part of a fused q/k/v."""
    for fused in spec.fused():
        if m := _compile(fused.native).match(key):
            groups = m.groupdict()
            return fused, fused.original.format(n=groups["n"], w=groups["w"]), groups["p"]
    return None


def join_fused(fused: FusedQKV, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: LayoutSpec) -> torch.Tensor:
    """The original fused tensor of the q, k and v parts (rows grouped per KV head, or stacked)."""
    return join_wqkv(q, k, v, spec) if fused.grouped else torch.cat([q, k, v])


def to_original(state: dict[str, torch.Tensor], spec: LayoutSpec) -> dict[str, torch.Tensor]:
    """Convert a native state dict to original keys (fusing the ViT's qkv and the family's fused q/k/v); unknown keys
    raise KeyError."""
    out: dict[str, torch.Tensor] = {}
    parts_of: dict[tuple[FusedQKV, str], dict[str, torch.Tensor]] = {}
    for key, tensor in per_expert(state, spec).items():
        if found := fused_part(key, spec):
            fused, name, part = found
            parts_of.setdefault((fused, name), {})[part] = tensor
            continue
        name = original_name(key, spec)
        if name is None:
            raise KeyError(key)
        out[name] = tensor
    for (fused, name), parts in parts_of.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{name}: only {sorted(parts)} of q/k/v present")
        out[name] = join_fused(fused, parts["q"], parts["k"], parts["v"], spec)
    return out


@dataclass(frozen=True)
class ExpertSlot:
    """Where a per-expert tensor of the files goes: ``param[expert]``, block ``part`` of ``parts`` equal blocks along
    that expert's first dimension."""

    param: str
    expert: int
    part: int
    parts: int

    def index(self, param_shape) -> tuple:
        """The index of this slot in a grouped parameter of ``param_shape`` ([E, rows, ...])."""
        rows = param_shape[1] // self.parts
        return self.expert, slice(self.part * rows, (self.part + 1) * rows)


def expert_slot(key: str, spec: LayoutSpec) -> ExpertSlot | None:
    """The slot of a native per-expert key (``...layers.3.mlp.experts.7.up_proj.weight``), None for any other key."""
    moe = families.get(spec.family).moe
    for part in moe.expert_parts if moe else ():
        if m := _compile(_LAYER + moe.experts + ".{e}." + part.leaf).match(key):
            param = (_LAYER + moe.experts + "." + part.param).format(n=m["n"])
            return ExpertSlot(param, int(m["e"]), part.part, part.parts)
    return None


def split_experts(key: str, tensor: torch.Tensor, spec: LayoutSpec) -> list[tuple[str, torch.Tensor]] | None:
    """The per-expert (native key, view) pairs the files hold for a grouped expert parameter; None when ``key`` is
    not one the family splits."""
    moe = families.get(spec.family).moe
    parts = [p for p in (moe.expert_parts if moe else ()) if _compile(_LAYER + moe.experts + "." + p.param).match(key)]
    if not parts:
        return None
    n = _compile(_LAYER + moe.experts + "." + parts[0].param).match(key)["n"]
    out = []
    for e in range(tensor.shape[0]):
        for part in parts:
            index = ExpertSlot(key, e, part.part, part.parts).index(tensor.shape)
            out.append(((_LAYER + moe.experts + ".{e}." + part.leaf).format(n=n, e=e), tensor[index]))
    return out


def per_expert(state: dict[str, torch.Tensor], spec: LayoutSpec) -> dict[str, torch.Tensor]:
    """``state`` with every grouped expert parameter the family's files split replaced by its per-expert views."""
    out = {}
    for key, tensor in state.items():
        split = split_experts(key, tensor, spec)
        out.update(split if split is not None else [(key, tensor)])
    return out


def normalize_native_key(key: str) -> str:
    """Map keys of native checkpoints saved by older transformers onto today's names."""
    for old, new in LEGACY_NATIVE_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key
