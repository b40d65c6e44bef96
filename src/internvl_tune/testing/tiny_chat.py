"""Tiny random InternVL checkpoints (InternVL2, 2.5, 3 and 3.5) with the on-disk layout of each release.

Each one has the original ``config.json`` keys of its model (InternVLChatModel, nested ``vision_config`` and
``llm_config``), bf16 safetensors with the original key names (sharded with an index like the multi-GB releases) and the
tokenizer files its LLM ships. Widths and depths are tiny, so tests and demos run in seconds. The Qwen2 / Qwen2.5 /
Qwen3 ones get the real tokenizer; the others get a small tokenizer trained at run time in the LLM's file format.
``RELEASES`` is the one table of what each release is made of; ``NATIVE_RELEASES`` names the transformers "-hf"
conversions, written in transformers' native layout.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from internvl_tune.constants import IMAGENET_MEAN, IMAGENET_STD, SPECIAL_TOKENS
from internvl_tune.errors import UserError
from internvl_tune.models.internvl_chat import config as cfg
from internvl_tune.models.internvl_chat import families
from internvl_tune.testing.tokenizers import (
    QWEN_ADDED_TOKENS,
    qwen_vocab_size,
    write_harmony_tokenizer,
    write_qwen2_tokenizer,
)


@dataclass(frozen=True)
class Release:
    """What a released checkpoint is made of.

    Attributes:
        llm: the LLM it was built on.
        family: its ``llm_config`` family (a name of ``families.FAMILIES``).
        tokenizer: the tokenizer files it ships: ``qwen2``, ``qwen2.5``, ``qwen3``, ``internlm2``, ``internlm3``,
            ``phi3``, ``yi``, ``llama3`` or ``o200k_harmony`` (GPT-OSS).
        vision: the InternViT release (the 6B ones have RMSNorm, qk-norm and no qkv bias).
        template: ``config.json`` ``template``.
        series: ``internvl2``, ``internvl2_5``, ``internvl3`` or ``internvl3_5``: which config keys the series writes.
    """

    llm: str
    family: str
    tokenizer: str
    vision: str
    template: str
    series: str


VIT_300M, VIT_300M_V2_5 = "InternViT-300M-448px", "InternViT-300M-448px-V2_5"
VIT_6B, VIT_6B_V2_5 = "InternViT-6B-448px-V1-5", "InternViT-6B-448px-V2_5"
_V2, _V25, _V3, _V35 = "internvl2", "internvl2_5", "internvl3", "internvl3_5"
RELEASES = {
    "internvl2-1b": Release("Qwen2-0.5B-Instruct", "qwen2", "qwen2", VIT_300M, "Hermes-2", _V2),
    "internvl2-2b": Release("internlm2-chat-1_8b", "internlm2", "internlm2", VIT_300M, "internlm2-chat", _V2),
    "internvl2-4b": Release("Phi-3-mini-128k-instruct", "phi3", "phi3", VIT_300M, "phi3-chat", _V2),
    "internvl2-8b": Release("internlm2_5-7b-chat", "internlm2", "internlm2", VIT_300M, "internlm2-chat", _V2),
    "internvl2-26b": Release("internlm2-chat-20b", "internlm2", "internlm2", VIT_6B, "internlm2-chat", _V2),
    "internvl2-40b": Release("Nous-Hermes-2-Yi-34B", "llama", "yi", VIT_6B, "Hermes-2", _V2),
    "internvl2-76b": Release("Hermes-2-Theta-Llama-3-70B", "llama", "llama3", VIT_6B, "Hermes-2", _V2),
    "internvl2_5-1b": Release("Qwen2.5-0.5B-Instruct", "qwen2", "qwen2.5", VIT_300M_V2_5, "internvl2_5", _V25),
    "internvl2_5-2b": Release("internlm2_5-1_8b-chat", "internlm2", "internlm2", VIT_300M_V2_5, "internvl2_5", _V25),
    "internvl2_5-4b": Release("Qwen2.5-3B-Instruct", "qwen2", "qwen2.5", VIT_300M_V2_5, "internvl2_5", _V25),
    "internvl2_5-8b": Release("internlm2_5-7b-chat", "internlm2", "internlm2", VIT_300M_V2_5, "internvl2_5", _V25),
    "internvl2_5-26b": Release("internlm2_5-20b-chat", "internlm2", "internlm2", VIT_6B_V2_5, "internvl2_5", _V25),
    "internvl2_5-38b": Release("Qwen2.5-32B-Instruct", "qwen2", "qwen2.5", VIT_6B_V2_5, "internvl2_5", _V25),
    "internvl2_5-78b": Release("Qwen2.5-72B-Instruct", "qwen2", "qwen2.5", VIT_6B_V2_5, "internvl2_5", _V25),
    "internvl3-1b": Release("Qwen2.5-0.5B", "qwen2", "qwen2.5", VIT_300M_V2_5, "internvl2_5", _V3),
    "internvl3-2b": Release("Qwen2.5-1.5B", "qwen2", "qwen2.5", VIT_300M_V2_5, "internvl2_5", _V3),
    "internvl3-8b": Release("Qwen2.5-7B", "qwen2", "qwen2.5", VIT_300M_V2_5, "internvl2_5", _V3),
    "internvl3-9b": Release("internlm3-8b-instruct", "internlm3", "internlm3", VIT_300M_V2_5, "internvl2_5", _V3),
    "internvl3-14b": Release("Qwen2.5-14B", "qwen2", "qwen2.5", VIT_300M_V2_5, "internvl2_5", _V3),
    "internvl3-38b": Release("Qwen2.5-32B", "qwen2", "qwen2.5", VIT_6B_V2_5, "internvl2_5", _V3),
    "internvl3-78b": Release("Qwen2.5-72B", "qwen2", "qwen2.5", VIT_6B_V2_5, "internvl2_5", _V3),
    # InternVL3.5 dense: Qwen3 (its -Pretrained / -Instruct / -MPO stages share the layout, config keys and tokenizer)
    "internvl3_5-1b": Release("Qwen3-0.6B", "qwen3", "qwen3", VIT_300M_V2_5, "internvl2_5", _V35),
    "internvl3_5-2b": Release("Qwen3-1.7B", "qwen3", "qwen3", VIT_300M_V2_5, "internvl2_5", _V35),
    "internvl3_5-4b": Release("Qwen3-4B", "qwen3", "qwen3", VIT_300M_V2_5, "internvl2_5", _V35),
    "internvl3_5-8b": Release("Qwen3-8B", "qwen3", "qwen3", VIT_300M_V2_5, "internvl2_5", _V35),
    "internvl3_5-14b": Release("Qwen3-14B", "qwen3", "qwen3", VIT_300M_V2_5, "internvl2_5", _V35),
    "internvl3_5-38b": Release("Qwen3-32B", "qwen3", "qwen3", VIT_6B_V2_5, "internvl2_5", _V35),
    # InternVL3.5 mixture-of-experts: Qwen3-MoE (experts stored one tensor each) and GPT-OSS (grouped experts,
    # attention sinks, sliding window on every other layer; the o200k_harmony tokenizer format)
    "internvl3_5-30b-a3b": Release("Qwen3-30B-A3B", "qwen3_moe", "qwen3", VIT_300M_V2_5, "internvl2_5", _V35),
    "internvl3_5-241b-a28b": Release("Qwen3-235B-A22B", "qwen3_moe", "qwen3", VIT_6B_V2_5, "internvl2_5", _V35),
    "internvl3_5-gpt-oss-20b-a4b": Release("gpt-oss-20b", "gpt_oss", "o200k_harmony", VIT_300M_V2_5,
                                           "internvl3_5_gpt_oss", _V35),
}
# transformers' native ("-hf") conversions: like -> the original release it converts.
NATIVE_RELEASES = {"internvl3-1b-hf": "internvl3-1b",
                   **{f"{like}-hf": like for like in RELEASES if like.startswith("internvl3_5-")}}
# The series whose configs carry InternVL3's extra keys (image_fold, InternViT's switched-off MoE settings).
_FROM_V3 = (_V3, _V35)
# The InternVL3 vision configs carry the (switched off) mixture-of-experts settings of InternViT's code.
_VIT_MOE_KEYS = {
    "capacity_factor": 1.2, "eval_capacity_factor": 1.4, "laux_allreduce": "all_nodes", "moe_coeff_ratio": 0.5,
    "moe_intermediate_size": 768, "moe_output_scale": 4.0, "noisy_gate_policy": "RSample_before", "num_experts": 8,
    "num_routed_experts": 4, "num_shared_experts": 4, "shared_expert_intermediate_size": 3072, "use_moe": False,
    "use_residual": True, "use_rts": False, "use_weighted_residual": False,
}
QWEN_SPECIAL_IDS = {"bos_token_id": 151643, "eos_token_id": 151645}  # <|endoftext|>, <|im_end|> in every Qwen LLM config
INTERNLM2_CHAT_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]

# Training text for the tiny tokenizers (our own sentences; English, Chinese, code, numbers).
_CORPUS = """A photo of a cat sitting on a wooden table next to a cup of coffee.
The astronaut stands in front of the flag and smiles at the camera.
Describe the image in detail. What is the color of the car? How many people are there?
The rocket lifts off from the launch pad, leaving a long trail of smoke behind it.
Please answer the question with a single word or phrase. The answer is yes.
一只猫坐在木桌上，旁边放着一杯咖啡。宇航员站在旗帜前面微笑。请详细描述这张图片。
def tile(image, size=448):\n    return [image.crop(box) for box in boxes(image, size)]
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 256 448 2024. Boxes: [[12, 34, 56, 78]] and (0.5, 0.25).
"""


def _vision_config(release: Release, image_size: int) -> dict:
    """InternViT-300M (LayerNorm, qkv bias) or InternViT-6B (RMSNorm, qk-norm, no qkv bias), tiny."""
    large = "6B" in release.vision
    scaled = large or release.series in _FROM_V3  # layer-scale init 0.1 (InternViT-6B, and InternVL3's 300M)
    return {
        **(_VIT_MOE_KEYS if release.series in _FROM_V3 else {}),
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": 32,
        "image_size": image_size,
        "initializer_factor": 0.1 if scaled else 1.0,
        "initializer_range": 1e-10 if scaled else 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-6,
        "model_type": "intern_vit_6b",
        "norm_type": "rms_norm" if large else "layer_norm",
        "num_attention_heads": 2,
        "num_channels": 3,
        "num_hidden_layers": 2,
        "patch_size": 14,
        "qk_normalization": large,
        "qkv_bias": not large,
        "use_flash_attn": False,
    }


def _qwen2_keys(release: Release) -> dict:
    if release.tokenizer == "qwen2":
        return dict(rope_theta=1000000.0, sliding_window=4096, use_sliding_window=False, max_window_layers=2,
                    attention_dropout=0.0, rope_scaling=None)
    # Qwen2.5, with InternVL's dynamic rope scaling written in both spellings
    keys = dict(rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False, max_window_layers=70,
                attention_dropout=0.0, rope_scaling={"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"})
    return keys | ({"moe_config": None} if release.series == _V3 else {})


def _internlm2_keys(release: Release) -> dict:
    keys = dict(bias=False, rope_theta=1000000.0, attn_implementation="eager",
                rope_scaling={"type": "dynamic", "factor": 2.0},
                auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                          "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                          "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
    if release.series != _V2:  # InternLM2.5's config as InternVL2.5 ships it
        keys.update(pretraining_tp=1, rms_norm_eps=1e-5)
        keys["auto_map"]["AutoModelForSequenceClassification"] = "modeling_internlm2.InternLM2ForSequenceClassification"
    return keys


def _internlm3_keys(release: Release) -> dict:
    # head_dim is its own key: here not hidden_size / heads, to exercise it
    return dict(bias=False, qkv_bias=False, head_dim=24, rope_theta=50000000, rms_norm_eps=1e-5, attention_dropout=0.0,
                rope_scaling={"factor": 6.0, "rope_type": "dynamic"},
                auto_map={"AutoConfig": "configuration_internlm3.InternLM3Config",
                          "AutoModel": "modeling_internlm3.InternLM3Model",
                          "AutoModelForCausalLM": "modeling_internlm3.InternLM3ForCausalLM"})


def _phi3_keys(release: Release) -> dict:
    half = 64 // 4 // 2
    return dict(rope_theta=10000.0, original_max_position_embeddings=256, max_position_embeddings=4096,
                sliding_window=2047, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, rms_norm_eps=1e-5,
                rope_scaling={"type": "su", "short_factor": [1.0 + 0.05 * i for i in range(half)],
                              "long_factor": [1.5 + 0.25 * i for i in range(half)]})


def _llama_keys(release: Release) -> dict:
    return dict(rope_theta=5000000.0, attention_bias=False, mlp_bias=False, pretraining_tp=1, rope_scaling=None)


def _qwen3_keys(release: Release) -> dict:
    # Qwen3's config keys; head_dim is its own key (128 in the releases): here not hidden_size / heads, to exercise it
    return dict(attention_bias=False, attention_dropout=0.0, head_dim=24, max_position_embeddings=40960,
                max_window_layers=2, layer_types=["full_attention"] * 2, rope_theta=1000000, rope_scaling=None,
                sliding_window=None, use_sliding_window=False)


def _qwen3_moe_keys(release: Release) -> dict:
    # Qwen3-30B-A3B's / Qwen3-235B-A22B's config keys (128 experts, 8 per token, norm_topk_prob true, the aux loss
    # off: output_router_logits false) with 8 experts, 2 per token; widths multiples of 8 (grouped matmuls)
    return dict(attention_bias=False, attention_dropout=0.0, decoder_sparse_step=1, head_dim=24,
                max_position_embeddings=40960, max_window_layers=2, mlp_only_layers=[], moe_intermediate_size=32,
                norm_topk_prob=True, num_experts=8, num_experts_per_tok=2, output_router_logits=False,
                rope_scaling=None, rope_theta=1000000.0, router_aux_loss_coef=0.001, sliding_window=None,
                use_sliding_window=False)


def _gpt_oss_keys(release: Release) -> dict:
    # gpt-oss-20b's config keys (32 experts, 4 per token, yarn rope, sinks, a 128-token window on every other layer,
    # router_aux_loss_coef 0.9) with 8 experts, 2 per token and a 4-token window, so that the window acts on the
    # tiny prompts
    return dict(attention_bias=True, attention_dropout=0.0, experts_per_token=2, head_dim=24, hidden_act="silu",
                initial_context_length=4096, intermediate_size=32, layer_types=["sliding_attention", "full_attention"],
                max_position_embeddings=131072, num_experts_per_tok=2, num_local_experts=8, output_router_logits=False,
                rms_norm_eps=1e-5, rope_theta=150000.0, router_aux_loss_coef=0.9, sliding_window=4, swiglu_limit=7.0,
                rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                              "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False})


# The keys (and rope style) each family's llm_config adds to the common ones, for a release: one entry per family.
TINY_LLM_KEYS = {"qwen2": _qwen2_keys, "internlm2": _internlm2_keys, "internlm3": _internlm3_keys, "phi3": _phi3_keys,
                 "llama": _llama_keys, "qwen3": _qwen3_keys, "qwen3_moe": _qwen3_moe_keys, "gpt_oss": _gpt_oss_keys}


def _llm_config(release: Release, vocab_size: int, special_ids: dict) -> dict:
    """A tiny LLM config with the keys (and rope style) of the release's LLM config."""
    return {
        "architectures": [families.get(release.family).architectures[0]],
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "model_type": release.family,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
        **special_ids,
        **TINY_LLM_KEYS[release.family](release),
    }


def tiny_original_config(like: str, vocab_size: int, special_ids: dict, image_size: int = 56) -> dict:
    """The original InternVLChatConfig dict of a tiny ``like`` model."""
    release = RELEASES[like]
    extra = {"image_fold": None} if release.series in _FROM_V3 else {}
    return {**extra,
        "architectures": ["InternVLChatModel"],
        "auto_map": dict(cfg.ORIGINAL_AUTO_MAP),
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": image_size,
        "llm_config": _llm_config(release, vocab_size, special_ids),
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": release.template,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": _vision_config(release, image_size),
    }


def _train_sentencepiece(user_symbols: list[str], vocab_size: int = 400) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() * 4), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, user_defined_symbols=user_symbols,
        hard_vocab_limit=False, split_digits=True, minloglevel=2,
    )
    return model.getvalue()


def _token_entry(content: str, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_spm_tokenizer(out: Path, style: str) -> tuple[int, dict]:
    """tokenizer.model + tokenizer_config.json of an InternLM2 / InternLM3 / Phi-3 / Yi checkpoint; returns (vocab,
    special ids)."""
    import sentencepiece as spm

    in_model = {"internlm2": INTERNLM2_CHAT_TOKENS, "internlm3": INTERNLM2_CHAT_TOKENS,
                "yi": ["<|im_start|>", "<|im_end|>"], "phi3": []}[style]
    proto = _train_sentencepiece(in_model)
    (out / "tokenizer.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    size = sp.get_piece_size()
    decoder = {str(i): _token_entry(sp.id_to_piece(i)) for i in range(3)}  # <unk>, <s>, </s>
    decoder.update({str(sp.piece_to_id(t)): _token_entry(t) for t in in_model})
    above = (PHI3_ADDED if style == "phi3" else []) + list(SPECIAL_TOKENS)
    decoder.update({str(size + i): _token_entry(t, special=t not in PHI3_ADDED[2:6] + PHI3_ADDED[8:10])
                    for i, t in enumerate(above)})
    config = {"added_tokens_decoder": decoder, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
              "unk_token": "<unk>", "model_max_length": 8192, "add_bos_token": True, "add_eos_token": False}
    if style in ("internlm2", "internlm3"):
        name = "InternLM2Tokenizer" if style == "internlm2" else "InternLM3Tokenizer"
        config.update(tokenizer_class=name, eos_token="</s>", pad_token="</s>",
                      additional_special_tokens=INTERNLM2_CHAT_TOKENS[::-1] + list(SPECIAL_TOKENS),
                      auto_map={"AutoTokenizer": [f"tokenization_{style}.{name}", None]})
        if style == "internlm3":  # its remote class's own settings
            config.update(add_prefix_space=False, spaces_between_special_tokens=False, sp_model_kwargs={},
                          use_default_system_prompt=False)
        ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    elif style == "phi3":
        config.update(tokenizer_class="LlamaTokenizer", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                      legacy=False, sp_model_kwargs={}, use_default_system_prompt=False,
                      additional_special_tokens=list(SPECIAL_TOKENS))
        ids = {"bos_token_id": 1, "eos_token_id": size, "pad_token_id": size}
    else:
        config.update(tokenizer_class="LlamaTokenizer", eos_token="<|im_end|>", pad_token="<unk>", legacy=True,
                      sp_model_kwargs={}, additional_special_tokens=list(SPECIAL_TOKENS))
        ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    _write_json(out / "tokenizer_config.json", config)
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    _write_json(out / "special_tokens_map.json", {**special_map, "additional_special_tokens": config["additional_special_tokens"]})
    return size + len(above), ids


def _write_llama3_tokenizer(out: Path) -> tuple[int, dict]:
    """A byte-level BPE ``tokenizer.json`` in Llama-3's style (BOS added by the post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    base = tok.get_vocab_size()
    tok.add_special_tokens(LLAMA3_SPECIALS + list(SPECIAL_TOKENS))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(out / "tokenizer.json"))
    decoder = {str(tok.token_to_id(t)): _token_entry(t) for t in LLAMA3_SPECIALS + list(SPECIAL_TOKENS)}
    _write_json(out / "tokenizer_config.json", {
        "added_tokens_decoder": decoder, "bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>",
        "pad_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True, "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": ["input_ids", "attention_mask"]})
    _write_json(out / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>",
                                                  "pad_token": "<|end_of_text|>"})
    return base + len(LLAMA3_SPECIALS) + len(SPECIAL_TOKENS), {
        "bos_token_id": bos, "eos_token_id": tok.token_to_id("<|im_end|>"), "pad_token_id": tok.token_to_id("<|end_of_text|>")}


def write_tiny_tokenizer(style: str, out: Path) -> tuple[int, dict]:
    """Write the tokenizer files of ``style``; returns (vocab size incl. InternVL tokens, LLM special ids)."""
    if style in QWEN_ADDED_TOKENS:
        write_qwen2_tokenizer(out, version=style)
        return qwen_vocab_size(style), QWEN_SPECIAL_IDS
    if style == "llama3":
        return _write_llama3_tokenizer(out)
    if style == "o200k_harmony":
        return write_harmony_tokenizer(out, _CORPUS.splitlines() * 4)
    return _write_spm_tokenizer(out, style)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter with seeded random values of a sensible scale (norm scales near 1, layer scales near 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "lambda_" in name:
                param.copy_(0.1 + 0.02 * noise)
            elif param.ndim == 1 and ("norm" in name or "layernorm" in name):
                param.copy_(1.0 + 0.1 * noise) if name.endswith("weight") else param.copy_(0.02 * noise)
            else:
                param.copy_(0.05 * noise)


# The chat template of the InternVL "-hf" releases: internvl2_5 turns (each ending "<|im_end|>\n") with no default
# system message; an image item is the processor's <IMG_CONTEXT> placeholder.
HF_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' ~ m['role'] ~ '\\n' }}{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif c['type'] == 'video' %}{{ '<video>\\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _write_native_release(like: str, out: Path, seed: int, image_size: int) -> None:
    """A "-hf" release written the way transformers' InternVL converter writes one: its ``InternVLConfig`` (the
    original llm_config as the family's native text config, InternViT keys renamed) and weights through
    ``save_pretrained``, Qwen's
    tokenizer with the InternVL tokens and image-token names added and the chat template set, a
    ``GotOcr2ImageProcessor`` and the ``InternVLProcessor`` config. The LM head stays a tensor of its own, as in the
    releases' weight files."""
    from transformers import (
        AutoConfig,
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        Qwen2Tokenizer,
    )

    from internvl_tune.models.internvl_chat.saving import chat_template

    source = NATIVE_RELEASES[like]
    image_tokens = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
    with tempfile.TemporaryDirectory() as base:  # the LLM's own tokenizer files, before InternVL's additions
        if RELEASES[source].tokenizer == "o200k_harmony":
            from transformers import PreTrainedTokenizerFast

            _, special_ids = write_harmony_tokenizer(base, _CORPUS.splitlines() * 4)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(base, extra_special_tokens=image_tokens)
            tokenizer.chat_template = chat_template(RELEASES[source].template, system_message="")
        else:
            write_qwen2_tokenizer(base, with_internvl_tokens=False, version=RELEASES[source].tokenizer)
            tokenizer = Qwen2Tokenizer.from_pretrained(base, extra_special_tokens=image_tokens)
            tokenizer.chat_template, special_ids = HF_CHAT_TEMPLATE, QWEN_SPECIAL_IDS
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    tokenizer.model_max_length = 8192
    tokenizer.save_pretrained(str(out))

    original = tiny_original_config(source, len(tokenizer), special_ids, image_size)
    dropped = set(_VIT_MOE_KEYS) | {"auto_map", "moe_config", "drop_path_rate", "use_flash_attn", "model_type",
                                    "architectures"}
    text = {k: v for k, v in original["llm_config"].items() if k not in dropped} | {"use_cache": True}
    vision = {k: v for k, v in original["vision_config"].items() if k not in dropped}
    vision.update(use_qk_norm=vision.pop("qk_normalization"), attention_bias=vision.pop("qkv_bias"),
                  use_absolute_position_embeddings=True)
    tokens_per_tile = cfg.num_image_token(original)
    text_config = AutoConfig.for_model(families.get(RELEASES[source].family).native_type, **text)
    config = InternVLConfig(text_config=text_config, vision_config=InternVLVisionConfig(**vision),
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            image_seq_length=tokens_per_tile, tie_word_embeddings=False)
    config.architectures = ["InternVLForConditionalGeneration"]
    model = InternVLForConditionalGeneration(config)
    randomize_(model, seed)
    model.to(torch.bfloat16).save_pretrained(str(out))
    GotOcr2ImageProcessor(do_resize=True, size={"height": image_size, "width": image_size}, do_rescale=True,
                          rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                          image_std=list(IMAGENET_STD), do_convert_rgb=True).save_pretrained(str(out))
    _write_json(out / "processor_config.json", {"image_seq_length": tokens_per_tile,
                                                "processor_class": "InternVLProcessor"})


def write_tiny_checkpoint(like: str, out_dir: str | Path, seed: int = 0, image_size: int = 56) -> Path:
    """Write a tiny random ``like`` checkpoint (bf16) into ``out_dir`` and return its path.

    Args:
        like: a name of ``RELEASES`` (original layout) or ``NATIVE_RELEASES`` (transformers' native layout).
        out_dir: target directory (created; must not hold another checkpoint).
        seed: seed of the random weights.
        image_size: tile size; 56 with patch 14 gives 4 image tokens per tile, 28 gives 1.
    """
    from internvl_tune.models.internvl_chat.loading import build_empty_model
    from internvl_tune.models.internvl_chat.saving import write_original_checkpoint

    if like not in RELEASES and like not in NATIVE_RELEASES:
        raise UserError(f"unknown --like {like!r}; choose one of {', '.join([*RELEASES, *NATIVE_RELEASES])}")
    if image_size % 28:
        raise UserError(f"image_size must be a multiple of 28 (patch 14, pixel shuffle 0.5), got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if like in NATIVE_RELEASES:
        _write_native_release(like, out, seed, image_size)
        return out
    vocab_size, special_ids = write_tiny_tokenizer(RELEASES[like].tokenizer, out)
    original = tiny_original_config(like, vocab_size, special_ids, image_size)
    native = cfg.native_config(original, image_token_id=0)
    model = build_empty_model(native).to_empty(device="cpu")
    randomize_(model, seed)
    shards = 1 if like.endswith("-1b") else 2  # the 1B releases are one file; larger ones are sharded
    write_original_checkpoint(out, model.to(torch.bfloat16).state_dict(), original, num_shards=shards)
    _write_json(out / "generation_config.json", {"_from_model_config": True, **special_ids})
    return out
