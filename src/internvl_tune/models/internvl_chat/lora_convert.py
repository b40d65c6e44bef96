"""LoRA adapters in the original InternVL2 layout, for servers that load the reference's module names (vLLM).

``convert_adapter`` rewrites a native adapter folder (``lora.save_adapter``) under the original InternVLChatModel names.
Where the original fuses q/k/v into one linear (InternViT ``attn.qkv``, a family's ``fused_qkv`` such as InternLM2's
``attention.wqkv``), the adapter becomes the exact fused equivalent: rank 3r, A stacked, B block-diagonal in the fused row order.

LoRA on grouped experts (``--moe_experts lora``: A [E, r, in], B [E, out, r] per grouped parameter) follows the
original layout of the family's experts. Where the files hold one linear per expert (Qwen3-MoE's
``mlp.experts.{e}.{gate,up,down}_proj``, ``MoeLayout.expert_parts``), each expert gets its own pair: A_e, and the
rows of B_e that make that linear (``gate_proj`` the first half of ``gate_up_proj``'s rows, ``up_proj`` the second,
sharing A_e) — the per-expert names vLLM's MoE LoRA reads. Where the original keeps the experts grouped (GPT-OSS),
the matrices stay in peft's ``target_parameters`` layout under the original prefix.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from pathlib import Path

import torch

from internvl_tune.errors import CheckpointError
from internvl_tune.models.internvl_chat.lora import (
    SPEC_FACTS,
    Adapter,
    check_base,
    expert_file_key,
    find_adapter,
    fingerprint,
    grouped_lora_a,
    grouped_lora_b,
    inside,
    read_adapter,
    resolve_base,
    write_adapter_files,
    write_files,
)


def convert_adapter(src, out_dir, layout: str, base=None, overwrite: bool = False) -> Path:
    """Re-write an adapter keyed by ``native`` names (this format; upgrades older folders) or ``original`` ones.

    Folders of the format before this one lack the LLM's head layout; it is then read from the base checkpoint's
    config (``base``, else the recorded one). With ``layout="native"``, a given ``base`` is also recorded, once it
    is checked to be the same model (e.g. the -hf conversion of the original base, which peft's ``AutoPeftModel``
    can load through transformers).
    """
    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.saving import atomic_directory

    adapter_dir = find_adapter(src)
    adapter = read_adapter(adapter_dir)
    if not set(SPEC_FACTS) <= set(adapter.fingerprint) or (base is not None and layout == "native"):
        chat = load_pretrained(resolve_base(adapter_dir, adapter, base), weights=False)
        check_base(chat, adapter, str(adapter_dir))
        adapter.fingerprint = fingerprint(chat)
        if base is not None and layout == "native":
            adapter.base = str(Path(base).resolve())
    with atomic_directory(Path(out_dir), overwrite) as tmp:
        if layout == "native":
            write_adapter_files(tmp, adapter)
        else:
            state, fields, modules_to_save = _to_original(adapter)
            fields.update(modules_to_save=modules_to_save or None, base_model_name_or_path=adapter.base)
            write_files(tmp, state, fields, {"layout": "original", "base_model": adapter.fingerprint})
    return Path(out_dir)


def split_for_llm_lora(src, out_dir, base=None, overwrite: bool = False, remote_code=None,
                       require_remote_code: bool = True) -> tuple[Path, Path]:
    """For servers whose LoRA covers the language model only (vLLM): ``out_dir/base``, the base checkpoint with the
    adapter's whole trained modules (``modules_to_save``: a trained ViT, projector or LM head) written in, in the
    original layout; and ``out_dir/adapter``, the LoRA matrices alone under original names, recording that base.

    Serving the two gives what training made, where the adapter alone would leave those parts as in the base.
    """
    import dataclasses

    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.saving import atomic_directory

    adapter_dir = find_adapter(src)
    adapter = read_adapter(adapter_dir)
    chat = load_pretrained(resolve_base(adapter_dir, adapter, base), dtype=None)  # the base's own dtypes
    check_base(chat, adapter, str(adapter_dir))
    params = dict(chat.model.named_parameters())
    with torch.no_grad():
        for key, value in adapter.trained.items():
            params[key].copy_(value.to(params[key].dtype))
    out = Path(out_dir)
    base_dir = chat.save_pretrained(out / "base", layout="original", overwrite=overwrite, remote_code=remote_code,
                                    require_remote_code=require_remote_code)
    lora_only = dataclasses.replace(adapter, trained={}, modules_to_save=[], base=str(base_dir.resolve()))
    with atomic_directory(out / "adapter", overwrite) as tmp:
        state, fields, _ = _to_original(lora_only)
        fields.update(modules_to_save=None, base_model_name_or_path=lora_only.base)
        write_files(tmp, state, fields, {"layout": "original", "base_model": adapter.fingerprint})
    return base_dir, out / "adapter"


# ------------------------------------------------------------------------------- original (InternVL2) names
def _name_pattern(module: str) -> str:
    """``a.b.3.c`` -> regex ``a\\.b\\.\\d+\\.c`` (every layer index)."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in module.split("."))


def _spec(adapter: Adapter):
    from internvl_tune.models.internvl_chat.key_map import LayoutSpec

    return LayoutSpec(*(adapter.fingerprint[k] for k in SPEC_FACTS))


def _fuse(parts: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: dict[str, int], join) -> tuple:
    """One LoRA pair on a fused q/k/v linear equal to the given per-projection pairs (A stacked, B block-diagonal)."""
    a = torch.cat([parts[p][0] for p in "qkv" if p in parts])
    blocks, offset = {}, 0
    for p in "qkv":
        blocks[p] = a.new_zeros(rows[p], a.shape[0])
        if p in parts:
            rank = parts[p][0].shape[0]
            blocks[p][:, offset:offset + rank] = parts[p][1]
            offset += rank
    return a, join(blocks["q"], blocks["k"], blocks["v"])


def _to_original(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """Tensors, ``LoraConfig`` fields and ``modules_to_save`` under the original InternVLChatModel names.

    Each module's ``alpha / r`` is folded into its B and ``lora_alpha`` equals the rank everywhere (scaling 1), so
    consumers that ignore ``rank_pattern`` / ``alpha_pattern`` (vLLM) still apply every update exactly.
    """
    from internvl_tune.models.internvl_chat.key_map import fused_part, join_fused, original_name, to_original

    spec = _spec(adapter)
    experts, grouped, target_parameters = _expert_lora(adapter, spec)
    pairs, fused = dict(experts), {}
    expert_keys = _expert_keys(adapter)
    linears = dataclasses.replace(adapter, lora={k: v for k, v in adapter.lora.items() if k not in expert_keys})
    for module, (a, b) in linears.lora_pairs().items():
        b = b * adapter.settings.scaling(module)
        if found := fused_part(module + ".weight", spec):
            linear, name, part = found
            fused.setdefault((linear, name.removesuffix(".weight")), {})[part] = (a, b)
        else:
            pairs[original_name(module + ".weight", spec).removesuffix(".weight")] = (a, b)
    kv = spec.num_kv_heads * spec.head_dim
    grouped_rows = {"q": spec.num_heads * spec.head_dim, "k": kv, "v": kv}
    for (linear, module), parts in fused.items():
        rows = grouped_rows if linear.grouped else dict.fromkeys("qkv", next(iter(parts.values()))[1].shape[0])
        pairs[module] = _fuse(parts, rows, lambda q, k, v: join_fused(linear, q, k, v, spec))
    state, modules_to_save = dict(grouped), []
    for module, (a, b) in pairs.items():
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = a, b
    for module in adapter.modules_to_save:
        tensors = {k: v for k, v in adapter.trained.items() if inside(k, [module])}
        try:
            original = to_original(tensors, spec)
        except KeyError as exc:
            raise CheckpointError(f"the trained module {module} has no counterpart in the original layout (it is one "
                                  f"part of a fused linear: {exc}) — serve the native adapter instead") from None
        modules_to_save.append(".".join(os.path.commonprefix([k.split(".")[:-1] for k in original])))
        state.update(original)
    if not pairs:
        raise CheckpointError("the adapter holds no LoRA layers (only modules_to_save) — nothing for an original-layout "
                              "LoRA to carry; merge it with merge-lora instead")
    rank = Counter(a.shape[0] for a, _ in pairs.values()).most_common(1)[0][0]
    patterns = {_name_pattern(m): a.shape[0] for m, (a, _) in pairs.items()}
    fields = {
        "r": rank, "lora_alpha": rank, "lora_dropout": adapter.settings.lora_dropout,
        "target_modules": "^(?:" + "|".join(sorted(patterns)) + ")$",
        "rank_pattern": {p: r for p, r in patterns.items() if r != rank},
        "alpha_pattern": {p: r for p, r in patterns.items() if r != rank},
    }
    if target_parameters:  # peft's expert LoRA takes no dropout
        fields.update(target_parameters=target_parameters, lora_dropout=0.0)
    return state, fields, modules_to_save


def _experts_of(adapter: Adapter) -> list[tuple[str, str]]:
    """``(native experts module, param)`` of every expert LoRA the adapter holds (a layer without experts has none)."""
    from internvl_tune.models.internvl_chat import families

    moe = families.get(adapter.fingerprint["family"]).moe
    if not adapter.settings.expert_targets or moe is None:
        return []
    found = []
    for n in range(adapter.fingerprint["llm_layers"]):
        module = f"{families.T}layers.{n}.{moe.experts}"
        found += [(module, param) for param in adapter.settings.expert_targets
                  if expert_file_key(module, adapter.settings, param, "A") in adapter.lora]
    return found


def _expert_keys(adapter: Adapter) -> set[str]:
    return {expert_file_key(module, adapter.settings, param, m) for module, param in _experts_of(adapter) for m in "AB"}


def _expert_lora(adapter: Adapter, spec) -> tuple[dict[str, tuple], dict[str, torch.Tensor], list[str]]:
    """The expert LoRA under original names (see the module docstring), ``alpha / r`` folded into B: per-expert
    ``{module: (A, B)}`` pairs, grouped ``{key: tensor}`` in peft's layout, and the latter's ``target_parameters``."""
    from internvl_tune.models.internvl_chat import families
    from internvl_tune.models.internvl_chat.key_map import expert_slot, original_name, split_experts

    moe = families.get(adapter.fingerprint["family"]).moe
    scaling = adapter.settings.llm_alpha / adapter.settings.llm_rank if adapter.settings.llm_rank else 0.0
    pairs, grouped = {}, {}
    for module, param in _experts_of(adapter):
        a = adapter.lora[expert_file_key(module, adapter.settings, param, "A")]
        b = adapter.lora[expert_file_key(module, adapter.settings, param, "B")] * scaling
        if moe.expert_parts:  # one linear per expert in the files: B's rows split as the weight's
            count = a.shape[0] // adapter.settings.llm_rank
            a, b = grouped_lora_a(a, count), grouped_lora_b(b, count)
            for key, rows in split_experts(f"{module}.{param}", b, spec):
                linear = original_name(key, spec).removesuffix(".weight")
                pairs[linear] = (a[expert_slot(key, spec).expert].clone(), rows.clone())  # no shared storage
        else:
            original = original_name(f"{module}.{param}", spec).removesuffix(f".{param}")
            for m, tensor in (("A", a), ("B", b)):
                grouped[expert_file_key(original, adapter.settings, param, m)] = tensor
    targets = [f"{moe.experts}.{p}" for p in adapter.settings.expert_targets] if grouped else []
    return pairs, grouped, targets
