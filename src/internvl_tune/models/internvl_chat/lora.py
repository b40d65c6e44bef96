"""LoRA for InternVL2 chat models (peft), with the reference's target modules mapped to native names.

The ViT's reference targets ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` are the native
``attention.{q,k,v}_proj``, ``projection_layer``, ``fc1``, ``fc2``; the LLM's are its family's
(``families.Family.lora_targets``: InternLM2's ``attention.wqkv`` ... ``feed_forward.w2`` become
``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``; Phi-3 keeps its fused ``qkv_proj`` / ``gate_up_proj``;
the other families have the native names already).

Defaults as the reference: ``lora_alpha = 2 * r``, dropout 0.05. Where the reference fuses q/k/v into one linear
(InternViT ``qkv``, InternLM2 ``wqkv``) we put one adapter on each of q, k and v; ``convert --to original`` writes
the exact fused equivalent (rank 3r, A stacked, B block-diagonal in the fused row order).

An adapter folder (``save_adapter``) is a peft adapter of the native ``InternVLForConditionalGeneration``, so
``peft.PeftModel.from_pretrained(load_pretrained(base).model, folder)`` loads it:

- ``adapter_config.json``: peft's ``LoraConfig`` (``target_modules`` as one regex, ``rank_pattern`` /
  ``alpha_pattern`` for the ViT where its rank or alpha differs from the LLM's, ``modules_to_save`` for the trained
  non-LoRA modules, ``base_model_name_or_path``);
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` and
  ``base_model.model.<module>.<parameter>`` for every module in ``modules_to_save``;
- ``internvl_tune_adapter.json``: our facts (format version, key layout, base-model fingerprint, rank / alpha /
  targets per part), which peft never reads.

Every parameter that trains besides the LoRA matrices (``--unfreeze_lm_head``, an unfrozen projector, unfrozen ViT
layers) is saved, as the smallest whole modules that hold it. peft never puts LoRA inside a module it saves whole,
so a LoRA layer inside such a module is folded into the saved weight.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from internvl_tune.errors import CheckpointError, UserError
from internvl_tune.models.common.lora import lora_modules, merge_lora_layers
from internvl_tune.models.common.moe import (
    EXPERT_LORA_PARAMS,
    add_expert_lora,
    experts_modules,
    has_expert_lora,
    merge_expert_lora,
)
from internvl_tune.models.internvl_chat.saving import atomic_directory
from internvl_tune.storage import save_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_INFO = "internvl_tune_adapter.json"
FORMAT_VERSION = 2
PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"
LORA_DROPOUT = 0.05
VIT_TARGETS = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")
_LLM_LAYER = r"model\.language_model\.layers\.\d+\."
_VIT_LAYER = r"model\.vision_tower\.encoder\.layer\.\d+\."
SPEC_FACTS = ("family", "llm_heads", "llm_kv_heads", "llm_head_dim")  # fingerprint keys that give the LayoutSpec


def default_llm_targets(family: str) -> tuple[str, ...]:
    """The reference's LLM LoRA targets of ``family`` (its name), as native leaf-module names."""
    from internvl_tune.models.internvl_chat import families

    return families.get(family).default_lora_targets


def _module_regex(layer: str, targets) -> str:
    return layer + r"(?:\w+\.)*(?:" + "|".join(map(re.escape, targets)) + ")"


@dataclass(frozen=True)
class LoraSettings:
    """What ``add_lora`` wrapped: rank, alpha and target leaf names of the LLM and of the ViT (rank 0: not wrapped)."""

    llm_rank: int = 0
    vision_rank: int = 0
    llm_alpha: float = 0
    vision_alpha: float = 0
    lora_dropout: float = LORA_DROPOUT
    llm_target_modules: tuple[str, ...] = ()
    vision_target_modules: tuple[str, ...] = ()
    expert_targets: tuple[str, ...] = ()  # grouped expert parameters with LoRA (rank and alpha of the LLM's)

    def parts(self) -> list[tuple[str, int, float]]:
        """``(module regex, rank, alpha)`` of each wrapped part, the LLM first."""
        parts = []
        if self.llm_rank:
            parts.append((_module_regex(_LLM_LAYER, self.llm_target_modules), self.llm_rank, self.llm_alpha))
        if self.vision_rank:
            parts.append((_module_regex(_VIT_LAYER, self.vision_target_modules), self.vision_rank, self.vision_alpha))
        return parts

    def peft_fields(self) -> dict:
        """``LoraConfig`` fields: the first part's rank and alpha, patterns for a second part that differs."""
        parts = self.parts()
        _, rank, alpha = parts[0]
        return {
            "r": rank, "lora_alpha": alpha, "lora_dropout": self.lora_dropout,
            "target_modules": "^(?:" + "|".join(regex for regex, _, _ in parts) + ")$",
            "rank_pattern": {regex: r for regex, r, _ in parts[1:] if r != rank},
            "alpha_pattern": {regex: a for regex, _, a in parts[1:] if a != alpha},
        }

    def file_fields(self, experts: str | None) -> dict:
        """``adapter_config.json`` fields: :meth:`peft_fields`, plus the expert LoRA as peft's ``target_parameters``
        (``experts``: the experts module's path inside a decoder layer). peft's expert LoRA takes no dropout, so an
        adapter with one says 0 (dropout only acts in training)."""
        fields = self.peft_fields()
        if self.expert_targets:
            fields.update(target_parameters=[f"{experts}.{name}" for name in self.expert_targets], lora_dropout=0.0)
        return fields

    def scaling(self, module: str) -> float:
        """``alpha / r`` of the LoRA layer on ``module`` (a native module name)."""
        for regex, rank, alpha in self.parts():
            if re.fullmatch(regex, module):
                return alpha / rank
        raise CheckpointError(f"LoRA weights for {module}, which the adapter's target modules do not cover")


@dataclass
class Adapter:
    """An adapter in memory, keyed by native names (what ``save_adapter`` writes and ``load_adapter`` reads).

    Attributes:
        settings: ranks, alphas and targets.
        fingerprint: shape facts of the base model (``fingerprint(chat)``).
        base: the base checkpoint it was trained on, as recorded.
        lora: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` tensors.
        trained: ``<module>.<parameter>`` tensors of the ``modules_to_save``.
        modules_to_save: the modules stored whole (they trained, or hold a parameter that trained).
    """

    settings: LoraSettings
    fingerprint: dict
    base: str | None
    lora: dict[str, torch.Tensor]
    trained: dict[str, torch.Tensor]
    modules_to_save: list[str]

    def lora_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A, B)}``."""
        modules = sorted({key.rsplit(".lora_", 1)[0] for key in self.lora})
        return {m: (self.lora[f"{m}.lora_A.weight"], self.lora[f"{m}.lora_B.weight"]) for m in modules}


def fingerprint(chat) -> dict:
    """Shape facts of the base model an adapter belongs to (also what mapping it to original names needs)."""
    from internvl_tune.models.internvl_chat.key_map import LayoutSpec

    text, vision = chat.model.config.text_config, chat.model.config.vision_config
    spec = LayoutSpec.from_original(chat.original_config)
    return {
        "family": chat.family,
        "llm_hidden_size": text.hidden_size,
        "llm_layers": text.num_hidden_layers,
        "llm_heads": spec.num_heads,
        "llm_kv_heads": spec.num_kv_heads,
        "llm_head_dim": spec.head_dim,
        "vocab_size": chat.model.get_input_embeddings().weight.shape[0],
        "vit_hidden_size": vision.hidden_size,
        "vit_layers": vision.num_hidden_layers,
    }


def _check_targets(layer, targets: tuple[str, ...], part: str) -> None:
    linears = sorted({name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)})
    unknown = [t for t in targets if t not in linears]
    if unknown:
        raise UserError(f"LoRA target modules {unknown} are not linear layers of the {part}; choose from {linears}")


def add_lora(chat, llm_rank: int = 0, vision_rank: int = 0, lora_alpha: float | None = None,
             lora_dropout: float = LORA_DROPOUT, llm_target_modules=None, vision_target_modules=None,
             expert_lora: bool = False) -> None:
    """Wrap the LLM (rank ``llm_rank``) and/or the ViT (rank ``vision_rank``) linears with LoRA, in place.

    As the reference (peft on the LLM / the ViT alone), a wrapped part is frozen except its LoRA matrices: the LLM
    with ``lm_head`` for ``llm_rank``, the ViT for ``vision_rank``; every other parameter keeps its ``requires_grad``.
    ``lora_alpha`` defaults to twice each part's rank; ``llm_target_modules`` / ``vision_target_modules`` are leaf
    names inside one decoder / ViT layer (default: the reference's, see the module docstring); LLM targets may also
    be the reference's names of the family (``attention.wqkv`` or ``wqkv`` of InternLM2 = q/k/v_proj).
    ``expert_lora``: a mixture-of-experts LLM's grouped experts get LoRA too, with the LLM's rank and alpha
    (``models.common.moe.add_expert_lora``).
    """
    if not (llm_rank or vision_rank):
        return
    from internvl_tune.models.internvl_chat import families

    inner = chat.model.model
    family = families.get(chat.family)
    llm_targets = (family.native_lora_targets(llm_target_modules) if llm_target_modules
                   else family.default_lora_targets) if llm_rank else ()
    vision_targets = tuple(vision_target_modules or VIT_TARGETS) if vision_rank else ()
    _check_targets(inner.language_model.layers[0], llm_targets, f"{chat.family} decoder layer")
    _check_targets(inner.vision_tower.encoder.layer[0], vision_targets, "ViT layer")
    settings = LoraSettings(
        llm_rank=llm_rank, vision_rank=vision_rank,
        llm_alpha=(2 * llm_rank if lora_alpha is None else lora_alpha) if llm_rank else 0,
        vision_alpha=(2 * vision_rank if lora_alpha is None else lora_alpha) if vision_rank else 0,
        lora_dropout=lora_dropout, llm_target_modules=llm_targets, vision_target_modules=vision_targets,
        expert_targets=EXPERT_LORA_PARAMS if expert_lora and llm_rank else (),
    )
    flags = {id(p): p.requires_grad for p in chat.model.parameters()}
    _inject(chat, settings)  # peft freezes every non-LoRA parameter
    _add_expert_lora(chat, settings)
    wrapped = ([inner.language_model, chat.model.lm_head] if llm_rank else []) + ([inner.vision_tower] if vision_rank else [])
    frozen = {id(p) for part in wrapped for p in part.parameters()}
    for name, p in chat.model.named_parameters():
        if not is_lora_name(name) and id(p) not in frozen:
            p.requires_grad_(flags[id(p)])


def _inject(chat, settings: LoraSettings, exclude: list[str] = ()) -> None:
    """Put LoRA layers per ``settings`` into ``chat.model``, skipping the modules in ``exclude`` and below them."""
    from peft import LoraConfig, inject_adapter_in_model

    exclude_regex = "^(?:" + "|".join(map(re.escape, exclude)) + r")(?:\..+)?$" if exclude else None
    was_training = chat.model.training
    inject_adapter_in_model(LoraConfig(**settings.peft_fields(), exclude_modules=exclude_regex), chat.model)
    chat.model.train(was_training)  # the new LoRA dropout modules start in training mode
    chat.lora_config = settings


def _add_expert_lora(chat, settings: LoraSettings) -> None:
    for _, experts in experts_modules(chat.model.model.language_model) if settings.expert_targets else ():
        add_expert_lora(experts, settings.llm_rank, settings.llm_alpha, settings.lora_dropout, settings.expert_targets)


def expert_file_key(experts: str, settings: LoraSettings, param: str, matrix: str) -> str:
    """peft's key of an expert LoRA matrix: its ``ParamWrapper`` s nest in ``target_parameters`` order, the last
    outermost (``mlp.experts.lora_A.weight`` for ``down_proj``, ``mlp.experts.base_layer.lora_A.weight`` for
    ``gate_up_proj``)."""
    depth = len(settings.expert_targets) - 1 - settings.expert_targets.index(param)
    return f"{experts}.{'base_layer.' * depth}lora_{matrix}.weight"


def expert_lora_tensors(chat) -> dict[str, torch.Tensor]:
    """The expert LoRA matrices in peft's layout: A [E, r, in] as [E * r, in]; B [E, out, r] as [out, r * E]
    (column ``j * E + e``), keyed as :func:`expert_file_key`."""
    out = {}
    for name, experts in experts_modules(chat.model):
        for param in getattr(experts, "lora_A", {}):
            a, b = experts.lora_A[param].detach(), experts.lora_B[param].detach()
            out[expert_file_key(name, chat.lora_config, param, "A")] = a.reshape(-1, a.shape[-1])
            out[expert_file_key(name, chat.lora_config, param, "B")] = b.permute(1, 2, 0).reshape(b.shape[1], -1)
    return out


def grouped_lora_a(a: torch.Tensor, experts: int) -> torch.Tensor:
    """peft's expert LoRA A [E * r, in] -> the grouped [E, r, in] (inverse of :func:`expert_lora_tensors`)."""
    return a.reshape(experts, -1, a.shape[-1])


def grouped_lora_b(b: torch.Tensor, experts: int) -> torch.Tensor:
    """peft's expert LoRA B [out, r * E] (column ``j * E + e``) -> the grouped [E, out, r]."""
    return b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)


def _expert_lora_as_own(chat, settings: LoraSettings, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``lora`` with its expert entries (peft's layout) turned into the experts modules' own parameters."""
    lora = dict(lora)
    for name, experts in experts_modules(chat.model) if settings.expert_targets else ():
        count = experts.gate_up_proj.shape[0]
        for param in settings.expert_targets:
            a = lora.pop(expert_file_key(name, settings, param, "A"), None)
            b = lora.pop(expert_file_key(name, settings, param, "B"), None)
            if a is not None:
                lora[f"{name}.lora_A.{param}"] = grouped_lora_a(a, count)
            if b is not None:
                lora[f"{name}.lora_B.{param}"] = grouped_lora_b(b, count)
    return lora


def has_lora(chat) -> bool:
    """True when the model holds (unmerged) LoRA layers (peft's, or LoRA on grouped experts)."""
    return bool(lora_modules(chat.model)) or has_expert_lora(chat.model)


def merge_lora(chat) -> None:
    """Fold every LoRA update into its base weight and put the plain linear layers back, in place."""
    merge_lora_layers(chat.model)
    merge_expert_lora(chat.model)
    chat.lora_config = None


# ------------------------------------------------------------------------------------------ trained modules
def is_lora_name(name: str) -> bool:
    """True for the parameters (and state-dict keys) of LoRA matrices: a name part starting with ``lora_``."""
    return any(part.startswith("lora_") for part in name.split("."))


def _plain(name: str) -> str:
    """A parameter or module name as in the model without LoRA (``q_proj.base_layer.weight`` -> ``q_proj.weight``)."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def trained_modules(model) -> list[str]:
    """The smallest whole modules holding every trainable non-LoRA parameter (peft's ``modules_to_save``).

    Each such parameter's module widens to its parent while every parameter below the parent trains too, up to
    the top-level parts (``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model``,
    ``lm_head``).
    """
    total, trained, owners = Counter(), Counter(), set()
    for name, p in model.named_parameters():
        if is_lora_name(name):
            continue
        parts = _plain(name).split(".")
        for i in range(1, len(parts)):
            total[".".join(parts[:i])] += 1
            trained[".".join(parts[:i])] += p.requires_grad
        if p.requires_grad:
            owners.add(".".join(parts[:-1]))
    chosen = set()
    for module in owners:
        parent = module.rpartition(".")[0]
        while parent not in ("", "model") and trained[parent] == total[parent]:
            module, parent = parent, parent.rpartition(".")[0]
        chosen.add(module)
    return sorted(chosen)


def _plain_state(module) -> dict[str, torch.Tensor]:
    """Parameters of ``module`` under their names without LoRA, each LoRA update folded into its base weight."""
    from peft.tuners.lora import LoraLayer

    state = {_plain(n): p.detach() for n, p in module.named_parameters() if not is_lora_name(n)}
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer):
            key = f"{name}.weight" if name else "weight"
            state[key] = state[key] + layer.get_delta_weight(ADAPTER_NAME).to(state[key].dtype)
    return state


def inside(name: str, modules) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


# ------------------------------------------------------------------------------------------------ save / load
def _recorded_base(chat, base) -> str | None:
    base = chat.source_dir if base is None else base
    if base is None:
        return None
    return str(Path(base).resolve()) if Path(base).exists() else str(base)


def save_adapter(chat, out_dir, base: str | Path | None = None) -> Path:
    """Write the LoRA weights, every other trained parameter and the configs into ``out_dir`` (see module docstring).

    ``base`` (default: the checkpoint ``chat`` was loaded from) is recorded as ``base_model_name_or_path``, as an
    absolute path when it exists here. Trained means ``requires_grad`` now: export a model whose flags mirror training.
    """
    settings = getattr(chat, "lora_config", None)
    if not has_lora(chat) or not isinstance(settings, LoraSettings):
        raise CheckpointError("the model has no LoRA adapter to save — train with --use_llm_lora / --use_backbone_lora")
    whole = trained_modules(chat.model)
    lora = {}
    for name, layer in lora_modules(chat.model):
        if not inside(name, whole):  # else folded into the module saved whole
            lora[f"{name}.lora_A.weight"] = layer.lora_A[ADAPTER_NAME].weight.detach()
            lora[f"{name}.lora_B.weight"] = layer.lora_B[ADAPTER_NAME].weight.detach()
    lora.update(expert_lora_tensors(chat))  # the experts' base weights never train alongside their LoRA
    trained = {f"{m}.{k}": v for m in whole for k, v in _plain_state(chat.model.get_submodule(m)).items()}
    adapter = Adapter(settings, fingerprint(chat), _recorded_base(chat, base), lora, trained, whole)
    out = Path(out_dir)
    with atomic_directory(out, overwrite=True) as tmp:  # a full disk never leaves half an adapter
        write_adapter_files(tmp, adapter)
    return out


def write_files(out: Path, state: dict[str, torch.Tensor], peft_fields: dict, info: dict) -> None:
    from peft import LoraConfig

    state = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_safetensors(state, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    LoraConfig(**peft_fields, inference_mode=True).save_pretrained(str(out))
    (out / ADAPTER_INFO).write_text(json.dumps({"format_version": FORMAT_VERSION, **info}, indent=2) + "\n")


# What peft's AutoPeftModel builds the base with when ``task_type`` is null (an InternVL adapter is no CAUSAL_LM
# one: its keys are those of transformers' InternVLForConditionalGeneration, which AutoModelForCausalLM does not build)
AUTO_MAPPING = {"base_model_class": "InternVLForConditionalGeneration", "parent_library": "transformers"}


def write_adapter_files(out: Path, adapter: Adapter) -> None:
    """Write ``adapter`` into the existing directory ``out``, keyed by native module names.

    ``peft.AutoPeftModel.from_pretrained(out)`` loads it (``auto_mapping``) when the recorded base is a native
    ("-hf") checkpoint, which transformers reads; for an original-layout base, ``internvl-tune convert`` re-records a
    native copy (docs/checkpoints.md, "LoRA adapters").
    """
    from internvl_tune.models.internvl_chat import families

    info = {"layout": "native", "base_model": adapter.fingerprint, "lora": asdict(adapter.settings)}
    moe = families.get(adapter.fingerprint["family"]).moe if adapter.settings.expert_targets else None
    fields = {**adapter.settings.file_fields(moe and moe.experts), "modules_to_save": adapter.modules_to_save or None,
              "base_model_name_or_path": adapter.base, "task_type": None, "auto_mapping": AUTO_MAPPING}
    write_files(out, {**adapter.lora, **adapter.trained}, fields, info)


def _check_complete(adapter_dir: Path) -> None:
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise CheckpointError(f"{adapter_dir}: not a complete LoRA adapter directory ({name} is missing) — pass the "
                                  "adapter directory a LoRA run wrote (adapter_config.json + adapter_model.safetensors)"
                                  " or the run's output directory that holds adapter/")


def adapter_dir_of(path) -> Path | None:
    """The adapter folder ``path`` names: ``path`` itself, or ``path/adapter`` (a LoRA run's output directory); None
    when it holds neither."""
    path = Path(path)
    if any((path / name).exists() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_INFO)):
        return path
    return path / "adapter" if (path / "adapter").is_dir() else None


def find_adapter(path) -> Path:
    """``adapter_dir_of(path)``, which must hold a complete adapter."""
    adapter_dir = adapter_dir_of(path) or Path(path)
    _check_complete(adapter_dir)
    return adapter_dir


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: cannot read the adapter weights ({exc}) — the file is truncated or corrupt; "
                              "copy it again from the training run") from exc


def _read_current(adapter_dir: Path, config: dict) -> tuple:
    from internvl_tune.models.internvl_chat.config import read_json

    info = read_json(adapter_dir / ADAPTER_INFO)
    if info.get("layout") != "native":
        raise CheckpointError(
            f"{adapter_dir / ADAPTER_INFO}: field layout is {info.get('layout')!r} — this adapter is keyed by the "
            "original InternVL2 module names (convert --to original, for vLLM and the reference code); load the "
            "native adapter it was converted from")
    settings = LoraSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["lora"].items()})
    weights = {}
    for key, value in _read_weights(adapter_dir / ADAPTER_WEIGHTS).items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {key} does not start with {PEFT_PREFIX!r} "
                                  f"— the file does not belong to this {ADAPTER_CONFIG}")
        weights[key[len(PEFT_PREFIX):]] = value
    return settings, info.get("base_model", {}), weights, list(config.get("modules_to_save") or [])


def _read_previous(adapter_dir: Path, config: dict) -> tuple:
    """The format before this one: ``model.state_dict()`` keys, ranks in ``adapter_config.json``, LoRA only."""
    per_rank = config.get("lora_alpha_per_rank", 2)
    llm_rank, vision_rank = config.get("llm_rank", 0), config.get("vision_rank", 0)
    family = config.get("base_model", {}).get("family")
    settings = LoraSettings(
        llm_rank=llm_rank, vision_rank=vision_rank, llm_alpha=per_rank * llm_rank, vision_alpha=per_rank * vision_rank,
        lora_dropout=config.get("lora_dropout", LORA_DROPOUT),
        llm_target_modules=default_llm_targets(family) if llm_rank else (),
        vision_target_modules=VIT_TARGETS if vision_rank else ())
    weights = _read_weights(adapter_dir / ADAPTER_WEIGHTS)
    return settings, config.get("base_model", {}), {k.replace(f".{ADAPTER_NAME}.", "."): v for k, v in weights.items()}, []


def read_adapter(path) -> Adapter:
    """Read an adapter folder (or a LoRA run's output directory) of this format or of the one before it.

    The one before it (no ``internvl_tune_adapter.json``) keyed the LoRA tensors as ``model.state_dict()`` does
    (``...lora_A.default.weight``) and kept ``llm_rank`` / ``vision_rank`` / ``lora_alpha_per_rank`` in
    ``adapter_config.json``.
    """
    from internvl_tune.models.internvl_chat.config import read_json

    adapter_dir = find_adapter(path)
    config = read_json(adapter_dir / ADAPTER_CONFIG)
    if (adapter_dir / ADAPTER_INFO).is_file():
        settings, facts, weights, modules_to_save = _read_current(adapter_dir, config)
    elif "llm_rank" in config:
        settings, facts, weights, modules_to_save = _read_previous(adapter_dir, config)
    else:
        raise CheckpointError(f"{adapter_dir}: {ADAPTER_INFO} is missing, so internvl-tune did not write this adapter — "
                              "load a plain peft adapter with peft.PeftModel.from_pretrained(load_pretrained(BASE).model, "
                              "ADAPTER_DIR)")
    trained = {k: v for k, v in weights.items() if not is_lora_name(k)}
    stray = sorted(k for k in trained if not inside(k, modules_to_save))
    if stray:
        raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensors {stray[:5]} are neither LoRA weights nor part "
                              f"of modules_to_save in {ADAPTER_CONFIG} — the two files do not belong together")
    lora = {k: v for k, v in weights.items() if is_lora_name(k)}
    modules = {k.rsplit(".lora_", 1)[0] for k in lora}
    unpaired = sorted(f"{m}.lora_{x}.weight" for m in modules for x in "AB" if f"{m}.lora_{x}.weight" not in lora)
    if unpaired:
        raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS}: lacks {unpaired[:5]} (each LoRA layer needs its A and B) "
                              "— the file is incomplete; copy it again from the training run")
    return Adapter(settings, facts, config.get("base_model_name_or_path"), lora, trained, modules_to_save)


def check_base(chat, adapter: Adapter, where: str) -> None:
    actual = fingerprint(chat)
    wrong = {k: (v, actual.get(k)) for k, v in adapter.fingerprint.items() if actual.get(k) != v}
    if wrong:
        details = ", ".join(f"{k}: adapter {a}, model {b}" for k, (a, b) in wrong.items())
        raise CheckpointError(f"{where}: this adapter was trained on {adapter.base!r}, which differs from the base model "
                              f"given ({details}) — pass that base model")


def apply_adapter(chat, adapter: Adapter, where: str = "the adapter") -> None:
    """Add the LoRA layers of ``adapter`` to ``chat``, fill them and the trained modules; they are left trainable."""
    check_base(chat, adapter, where)
    params = dict(chat.model.named_parameters())
    absent = [m for m in adapter.modules_to_save if not any(inside(p, [m]) for p in params)]
    if absent:
        raise CheckpointError(f"{where}: modules_to_save names {absent}, which this model does not have")
    expected = {p for p in params if inside(p, adapter.modules_to_save)}
    lacking = sorted(expected - set(adapter.trained))
    if lacking:
        raise CheckpointError(
            f"{where}: {ADAPTER_WEIGHTS} lacks {len(lacking)} tensors of the modules its config says were trained "
            f"(modules_to_save), e.g. {lacking[:3]} — the adapter is incomplete; export it again from the training run")
    if adapter.lora:
        _inject(chat, adapter.settings, exclude=adapter.modules_to_save)
        _add_expert_lora(chat, adapter.settings)
    else:
        chat.lora_config = adapter.settings
    lora = _expert_lora_as_own(chat, adapter.settings, adapter.lora)
    params = dict(chat.model.named_parameters())
    own = {n.replace(f".{ADAPTER_NAME}.", "."): n for n in params if is_lora_name(n)}
    if set(lora) != set(own) or set(adapter.trained) != expected:
        missing = sorted(set(own) - set(lora))
        extra = sorted((set(lora) - set(own)) | (set(adapter.trained) - expected))
        raise CheckpointError(f"{where}: adapter tensors do not match (missing {missing[:5]}, unexpected {extra[:5]})")
    device = chat.model.lm_head.weight.device
    with torch.no_grad():
        for key, value in lora.items():
            params[own[key]].copy_(value.to(device))
        for key, value in adapter.trained.items():
            params[key].copy_(value.to(device))
            params[key].requires_grad_(True)


def load_adapter(chat, adapter_dir) -> None:
    """Add LoRA layers to ``chat`` and load a saved adapter into them; the base must match the adapter's."""
    apply_adapter(chat, read_adapter(adapter_dir), str(adapter_dir))


def resolve_base(adapter_dir, adapter: Adapter, base=None) -> Path:
    """``base`` when given, else the base checkpoint recorded in the adapter, which must exist."""
    if base is not None:
        return Path(base)
    config = Path(adapter_dir) / ADAPTER_CONFIG
    if not adapter.base:
        raise CheckpointError(f"{config}: field base_model_name_or_path is empty — pass the base checkpoint with "
                              "--base PATH")
    if not Path(adapter.base).is_dir():
        raise CheckpointError(f"{config}: the base model recorded in base_model_name_or_path, {adapter.base!r}, is not "
                              "a directory here — pass its current location with --base PATH")
    return Path(adapter.base)


def load_with_adapter(path, base=None, **load_kwargs):
    """``load_pretrained`` of the adapter's base (``base`` overrides the recorded one) with the adapter loaded.

    ``path`` is an adapter folder or the output directory of a LoRA run (which holds ``adapter/``).
    """
    from internvl_tune.models.internvl_chat import load_pretrained

    adapter_dir = find_adapter(path)
    adapter = read_adapter(adapter_dir)
    chat = load_pretrained(resolve_base(adapter_dir, adapter, base), **load_kwargs)
    apply_adapter(chat, adapter, str(adapter_dir))
    return chat
