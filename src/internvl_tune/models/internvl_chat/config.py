"""InternVL chat configs (InternVL2, 2.5, 3, 3.5): the original ``InternVLChatConfig`` JSON <-> transformers' ``InternVLConfig``.

The original ``config.json`` (``model_type: internvl_chat``) nests ``vision_config`` (InternViT) and ``llm_config``
(its family, ``families.py``, picked by ``llm_config.architectures[0]``) and carries chat settings
the native config has no field for (``template``, ``ps_version``, dynamic tiling). We keep that dict as the source of
truth and derive the native config from it; a native save stores it beside the weights (``internvl_chat_config.json``)
so a round trip gives the original config back. A native checkpoint without it (a transformers "-hf" release) gets
an original config rebuilt from the native one, its template read from the checkpoint's chat template.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from internvl_tune.data.config import CheckpointDefaults
from internvl_tune.errors import CheckpointError
from internvl_tune.models.internvl_chat import families
from internvl_tune.models.internvl_chat.families import Family

SIDECAR = "internvl_chat_config.json"
# Where transformers keeps a checkpoint's chat template: (file, JSON key or None for the raw Jinja file), in the order
# looked at (today's file, then the processor's older places, then the tokenizer's).
CHAT_TEMPLATE_FILES = (("chat_template.jinja", None), ("chat_template.json", "chat_template"),
                       ("processor_config.json", "chat_template"), ("tokenizer_config.json", "chat_template"))
ORIGINAL_AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}
# InternVLChatConfig defaults (used when a key is absent, as the reference constructor does).
CHAT_DEFAULTS = {
    "select_layer": -1,
    "force_image_size": None,
    "downsample_ratio": 0.5,
    "template": None,
    "dynamic_image_size": False,
    "use_thumbnail": False,
    "ps_version": "v1",
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 6,
    "pad2square": False,
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
}
# Keys copied from an original llm_config into the native text config of every family (and back); each family adds
# its own (``Family.extra_keys``).
TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "initializer_range", "bos_token_id", "eos_token_id",
    "pad_token_id", "attention_dropout",
)


def read_json(path: Path) -> dict:
    """Read a JSON file, turning a missing or malformed file into a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found — is this an InternVL2 checkpoint directory?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}) — re-download or fix the file") from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {exc.start}) — re-download or fix the file") from exc


def detect_layout(config: dict, where: str = "config.json") -> str:
    """``original`` (InternVLChatModel) or ``native`` (InternVLForConditionalGeneration) from a config dict."""
    if "llm_config" in config or config.get("model_type") == "internvl_chat":
        return "original"
    if config.get("model_type") == "internvl" or "text_config" in config:
        return "native"
    raise CheckpointError(
        f"{where}: model_type {config.get('model_type')!r} is neither 'internvl_chat' (original InternVL2 layout) "
        "nor 'internvl' (transformers-native layout)"
    )


def family_of(original: dict, where: str = "config.json") -> Family:
    """The LLM family (``families.FAMILIES``) that ``llm_config.architectures[0]`` names."""
    archs = original.get("llm_config", {}).get("architectures") or [None]
    family = families.by_architecture(archs[0])
    if family is None:
        raise CheckpointError(
            f"{where}: field llm_config.architectures = {archs} is not supported; expected one of "
            f"{', '.join(families.architectures())}"
        )
    return family


def chat_setting(original: dict, key: str):
    """A top-level InternVLChatConfig setting with the reference default."""
    return original.get(key, CHAT_DEFAULTS[key])


def image_size(original: dict) -> int:
    """Tile size the model sees: ``force_image_size`` or the ViT's own ``image_size``."""
    return chat_setting(original, "force_image_size") or original["vision_config"].get("image_size", 224)


def num_image_token(original: dict) -> int:
    """Tokens per tile: (tile/patch)^2 * downsample_ratio^2, e.g. 256 for 448px tiles."""
    patch = original["vision_config"].get("patch_size", 14)
    return int((image_size(original) // patch) ** 2 * chat_setting(original, "downsample_ratio") ** 2)


def data_defaults(original: dict) -> CheckpointDefaults:
    """The input settings of a checkpoint, for ``DataConfig.resolve`` (template, tile size, tokens per tile, tiling,
    the system message it was fine-tuned with: ``system_message``, which our exports write and the releases lack)."""
    return CheckpointDefaults(
        template=chat_setting(original, "template"),
        image_size=image_size(original),
        downsample_ratio=chat_setting(original, "downsample_ratio"),
        num_image_token=num_image_token(original),
        dynamic_image_size=chat_setting(original, "dynamic_image_size"),
        use_thumbnail=chat_setting(original, "use_thumbnail"),
        min_dynamic_patch=chat_setting(original, "min_dynamic_patch"),
        max_dynamic_patch=chat_setting(original, "max_dynamic_patch"),
        system_message=original.get("system_message"),
    )


def read_original_config(path: Path) -> tuple[str, dict]:
    """``(layout, original InternVLChatConfig dict)`` of a checkpoint directory (native checkpoints: from the stored
    sidecar, or rebuilt from the native config with the template its chat template renders)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory — pass the folder that holds config.json and the weights")
    raw = read_json(path / "config.json")
    layout = detect_layout(raw, str(path / "config.json"))
    if layout == "original":
        return layout, raw
    if (path / SIDECAR).is_file():
        return layout, read_json(path / SIDECAR)
    return layout, original_from_native(raw, template=native_template(path))


def chat_template_of(path: Path) -> tuple[Path, str] | None:
    """``(file, Jinja text)`` of the chat template a checkpoint directory ships, or None (``CHAT_TEMPLATE_FILES``)."""
    for name, key in CHAT_TEMPLATE_FILES:
        file = path / name
        if not file.is_file():
            continue
        if key is None:
            return file, file.read_text(encoding="utf-8")
        value = read_json(file).get(key)
        if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}]
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        if value:
            return file, value
    return None


def template_of_chat_template(jinja: str) -> tuple[str | None, str]:
    """``(name, rendering)``: the conversation template whose prompt the Jinja chat template renders for a system +
    user + assistant probe (name None when none does). ``internlm2-chat`` and ``Hermes-2`` render alike (they differ
    only in training-time BOS handling, which the tokenizer decides here); ``Hermes-2`` is reported."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    from internvl_tune.data.templates import GPT, HUMAN, TEMPLATES

    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    try:
        rendered = render_jinja_template([probe], chat_template=jinja)[0][0]
    except TemplateError as exc:
        return None, f"(error: {exc})"
    names = [name for name, t in TEMPLATES.items() if t.prompt([(HUMAN, "U"), (GPT, "A")], "S") == rendered]
    return ("Hermes-2" if "Hermes-2" in names else next(iter(names), None)), rendered


def native_template(path: Path) -> str:
    """The conversation template of a native checkpoint without the sidecar, from its chat template."""
    from internvl_tune.data.templates import TEMPLATES

    found = chat_template_of(path)
    if found is None:
        files = ", ".join(name for name, _ in CHAT_TEMPLATE_FILES)
        raise CheckpointError(f"{path}: a native checkpoint without {SIDECAR} and without a chat template (looked in "
                              f"{files}), so its conversation template is unknown — copy in the chat template files "
                              "of its release")
    file, jinja = found
    name, rendered = template_of_chat_template(jinja)
    if name is None:
        raise CheckpointError(f"{file}: the chat template renders a system + user + assistant turn as {rendered!r}, "
                              f"which is none of the conversation templates here ({', '.join(TEMPLATES)}) — fine-tune "
                              "from the original-layout release of this model instead")
    return name


def checkpoint_data_defaults(path) -> CheckpointDefaults:
    """:func:`data_defaults` of a checkpoint directory, from its config files alone (no weights are read)."""
    return data_defaults(read_original_config(Path(path))[1])


def _rope_parameters(llm: dict, family: Family, where: str) -> dict:
    theta = float(llm.get("rope_theta", 10000.0))
    scaling = llm.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in family.rope_scaling:
        raise CheckpointError(f"{where}: llm_config.rope_scaling type {kind!r} is not supported for {family.name}")
    if kind in ("dynamic", "linear"):
        return {"rope_type": kind, "rope_theta": theta, "factor": float(scaling["factor"])}
    if kind in ("su", "longrope"):
        # Phi-3's "su" scaling is what transformers now calls "longrope" (same factors and attention scale).
        return {
            "rope_type": "longrope",
            "rope_theta": theta,
            "short_factor": list(scaling["short_factor"]),
            "long_factor": list(scaling["long_factor"]),
            "original_max_position_embeddings": llm.get("original_max_position_embeddings", 4096),
        }
    return {"rope_theta": theta, **scaling, "rope_type": kind}


def _native_biases(llm: dict, family: Family, where: str) -> dict:
    """Native ``attention_bias`` / ``mlp_bias`` from the family's llm_config bias switches (``Family.biases``)."""
    switches = family.biases
    values = {key: bool(llm.get(key, switches.default)) for key in switches.attention}
    if len(set(values.values())) > 1:  # Llama's attention_bias covers q/k/v and o_proj alike
        given = " and ".join(f"llm_config.{key} = {value}" for key, value in values.items())
        raise CheckpointError(
            f"{where}: {given}: an {family.name} with biases on q/k/v but not on o_proj (or the reverse) has no "
            "transformers equivalent; only equal values load (internlm3-8b-instruct: both false)")
    mlp = bool(llm.get(switches.mlp, switches.default)) if switches.mlp else False
    return {"attention_bias": next(iter(values.values())), "mlp_bias": mlp}


def native_text_config(original: dict, where: str = "config.json") -> dict:
    """The native text config (as a dict with ``model_type``) for the original ``llm_config``."""
    family = family_of(original, where)
    llm = original["llm_config"]
    text = {k: llm[k] for k in TEXT_KEYS + family.extra_keys if k in llm}
    text["model_type"] = family.native_type
    text["rope_parameters"] = _rope_parameters(llm, family, where)
    text["tie_word_embeddings"] = False
    if llm.get("moe_config"):
        raise CheckpointError(f"{where}: field llm_config.moe_config is set: an InternLM2-style mixture-of-experts "
                              "LLM, which is not supported (the MoE families are Qwen3-MoE and GPT-OSS)")
    if family.biases:
        text.update(_native_biases(llm, family, where))
    return text


def native_vision_config(original: dict, where: str = "config.json") -> dict:
    """The native InternVLVisionConfig kwargs for the original InternViT ``vision_config``."""
    vis = original["vision_config"]
    if vis.get("use_moe"):
        raise CheckpointError(f"{where}: field vision_config.use_moe is true: InternViT with mixture-of-experts MLPs "
                              "is not supported (dense checkpoints only)")
    return {
        "hidden_size": vis.get("hidden_size", 3200),
        "num_hidden_layers": vis.get("num_hidden_layers", 48),
        "num_attention_heads": vis.get("num_attention_heads", 25),
        "intermediate_size": vis.get("intermediate_size", 12800),
        "attention_bias": bool(vis.get("qkv_bias", False)),
        "use_qk_norm": bool(vis.get("qk_normalization", True)),
        "norm_type": vis.get("norm_type", "rms_norm"),
        "layer_norm_eps": vis.get("layer_norm_eps", 1e-6),
        "hidden_act": vis.get("hidden_act", "gelu"),
        "image_size": vis.get("image_size", 224),
        "patch_size": vis.get("patch_size", 14),
        "num_channels": vis.get("num_channels", 3),
        "hidden_dropout_prob": vis.get("dropout", 0.0),
        "projection_dropout": vis.get("dropout", 0.0),
        "attention_dropout": vis.get("attention_dropout", 0.0),
        "layer_scale_init_value": vis.get("initializer_factor", 0.1),
        "initializer_range": vis.get("initializer_range", 0.02),
        # InternViT has no final norm; mean pooling is the native switch that leaves it out.
        "use_mean_pooling": True,
    }


def native_config(original: dict, image_token_id: int, attn_implementation: str = "sdpa", where: str = "config.json"):
    """Build transformers' ``InternVLConfig`` equivalent to an original InternVLChatConfig dict."""
    from transformers import InternVLConfig

    select_layer = chat_setting(original, "select_layer")
    config = InternVLConfig(
        vision_config=native_vision_config(original, where),
        text_config=native_text_config(original, where),
        image_token_id=image_token_id,
        image_seq_length=num_image_token(original),
        downsample_ratio=chat_setting(original, "downsample_ratio"),
        projector_hidden_act="gelu",
        vision_feature_layer=select_layer,
        vision_feature_select_strategy="default",
        # The reference never ties the LM head to the embeddings; tying follows this top-level flag.
        tie_word_embeddings=False,
    )
    # a family whose attention only transformers' eager code applies fully (GPT-OSS's sinks) runs with it
    config._attn_implementation = family_of(original, where).attn_implementation or attn_implementation
    # The load-balancing loss comes from router hooks (models/common/moe.py), and transformers' InternVL output has
    # no field for router logits (its forward fails when the text model returns them): a checkpoint saying
    # output_router_logits true (the reference's GPT-OSS training saves it so) keeps it in its original config only.
    if getattr(config.text_config, "output_router_logits", False):
        config.text_config.output_router_logits = False
    return config


def _native_rope(text: dict) -> dict:
    """``rope_parameters`` of a native text config: as transformers 5 writes it, or from the ``rope_theta`` +
    ``rope_scaling`` that transformers 4.x wrote (e.g. in the InternVL "-hf" releases)."""
    if text.get("rope_parameters"):
        return text["rope_parameters"]
    scaling = dict(text.get("rope_scaling") or {})
    kind = scaling.pop("type", "default")  # the older name; "rope_type" wins where both are given
    kind = scaling.pop("rope_type", kind)
    return {**scaling, "rope_type": kind, "rope_theta": text.get("rope_theta", 10000.0)}


def original_from_native(native: dict, template: str | None = None) -> dict:
    """Rebuild an original InternVLChatConfig dict from a native config dict that has no stored original.

    ``template`` is the conversation template (native configs have no such field; see :func:`native_template`).
    """
    text, vis = native["text_config"], native["vision_config"]
    family = families.by_native_type(text.get("model_type"))
    if family is None:
        raise CheckpointError(f"native text model_type {text.get('model_type')!r} has no InternVL original layout")
    rope = _native_rope(text)
    text = {**{key: text[native] for key, native in family.native_names if native in text}, **text}
    llm = {k: text[k] for k in TEXT_KEYS + family.extra_keys if k in text}
    llm["architectures"] = [family.architectures[0]]
    llm["model_type"] = family.name
    llm["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") == "yarn":  # GPT-OSS writes its yarn settings under rope_type
        llm["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    elif rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "original_max_position_embeddings")}
        scaling["type"] = "su" if rope["rope_type"] == "longrope" else rope["rope_type"]
        llm["rope_scaling"] = scaling
        if rope["rope_type"] == "longrope":
            llm["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    else:
        llm["rope_scaling"] = None
    if family.biases:
        llm.update(dict.fromkeys(family.biases.attention, text.get("attention_bias", False)))
        if family.biases.mlp and family.biases.mlp not in family.biases.attention:
            llm[family.biases.mlp] = text.get("mlp_bias", False)
    llm["tie_word_embeddings"] = False
    size = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731 (native stores (h, w))
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": vis["hidden_size"],
        "num_hidden_layers": vis["num_hidden_layers"],
        "num_attention_heads": vis["num_attention_heads"],
        "intermediate_size": vis["intermediate_size"],
        "qkv_bias": vis.get("attention_bias", False),
        "qk_normalization": vis.get("use_qk_norm", False),
        "norm_type": vis.get("norm_type", "layer_norm"),
        "layer_norm_eps": vis.get("layer_norm_eps", 1e-6),
        "hidden_act": vis.get("hidden_act", "gelu"),
        "image_size": size(vis.get("image_size", 448)),
        "patch_size": size(vis.get("patch_size", 14)),
        "num_channels": vis.get("num_channels", 3),
        "dropout": vis.get("hidden_dropout_prob", 0.0),
        "attention_dropout": vis.get("attention_dropout", 0.0),
        "drop_path_rate": 0.0,
        "initializer_factor": vis.get("layer_scale_init_value", 0.1),
        "initializer_range": vis.get("initializer_range", 0.02),
        "use_flash_attn": False,
    }
    return {
        **CHAT_DEFAULTS,
        "architectures": ["InternVLChatModel"],
        "auto_map": dict(ORIGINAL_AUTO_MAP),
        "model_type": "internvl_chat",
        "vision_config": vision,
        "llm_config": llm,
        "select_layer": native.get("vision_feature_layer", -1),
        "downsample_ratio": native.get("downsample_ratio", 0.5),
        "force_image_size": vision["image_size"],
        "ps_version": "v2",
        "template": template,
        "tie_word_embeddings": False,
    }


def with_vocab_size(original: dict, vocab_size: int) -> dict:
    """A copy of ``original`` whose LLM vocabulary has ``vocab_size`` rows (after adding tokens)."""
    out = copy.deepcopy(original)
    out["llm_config"]["vocab_size"] = vocab_size
    return out
