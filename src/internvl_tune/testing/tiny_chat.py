"""Tiny random InternVL2 checkpoints with the exact on-disk layout of each released size.

Each one has the original ``config.json`` keys of its model (InternVLChatModel, nested ``vision_config`` and
``llm_config``), bf16 safetensors with the original key names (sharded with an index like the multi-GB releases) and the
tokenizer files its LLM family ships. Widths and depths are tiny, so tests and demos run in seconds. Qwen2 (1B) gets
the real tokenizer; the others get a small tokenizer trained at run time in the family's file format.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from internvl_tune.constants import SPECIAL_TOKENS
from internvl_tune.errors import UserError
from internvl_tune.models.internvl_chat import config as cfg
from internvl_tune.testing.tokenizers import write_qwen2_tokenizer

# like -> (LLM family, conversation template, InternViT kind, tokenizer style)
SIZES = {
    "internvl2-1b": ("qwen2", "Hermes-2", "300m", "qwen2"),
    "internvl2-2b": ("internlm2", "internlm2-chat", "300m", "internlm2"),
    "internvl2-4b": ("phi3", "phi3-chat", "300m", "phi3"),
    "internvl2-8b": ("internlm2", "internlm2-chat", "300m", "internlm2"),
    "internvl2-26b": ("internlm2", "internlm2-chat", "6b", "internlm2"),
    "internvl2-40b": ("llama", "Hermes-2", "6b", "yi"),
    "internvl2-76b": ("llama", "Hermes-2", "6b", "llama3"),
}
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


def _vision_config(kind: str, image_size: int) -> dict:
    """InternViT-300M (LayerNorm, qkv bias) or InternViT-6B (RMSNorm, qk-norm, no qkv bias), tiny."""
    large = kind == "6b"
    return {
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": 32,
        "image_size": image_size,
        "initializer_factor": 0.1 if large else 1.0,
        "initializer_range": 1e-10 if large else 0.02,
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


def _llm_config(family: str, vocab_size: int, special_ids: dict) -> dict:
    """A tiny LLM config with the keys (and rope style) of the family's released config."""
    base = {
        "architectures": [cfg.ARCH_BY_FAMILY[family]],
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
        **special_ids,
    }
    if family == "qwen2":
        base.update(model_type="qwen2", rope_theta=1000000.0, sliding_window=4096, use_sliding_window=False,
                    max_window_layers=2, attention_dropout=0.0, rope_scaling=None)
    elif family == "internlm2":
        base.update(model_type="internlm2", bias=False, rope_theta=1000000.0, attn_implementation="eager",
                    rope_scaling={"type": "dynamic", "factor": 2.0},
                    auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                              "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                              "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
    elif family == "phi3":
        half = 64 // 4 // 2
        base.update(model_type="phi3", rope_theta=10000.0, original_max_position_embeddings=256,
                    max_position_embeddings=4096, sliding_window=2047, resid_pdrop=0.0, embd_pdrop=0.0,
                    attention_dropout=0.0, rms_norm_eps=1e-5, rope_scaling={
                        "type": "su",
                        "short_factor": [1.0 + 0.05 * i for i in range(half)],
                        "long_factor": [1.5 + 0.25 * i for i in range(half)]})
    else:
        base.update(model_type="llama", rope_theta=5000000.0, attention_bias=False, mlp_bias=False,
                    pretraining_tp=1, rope_scaling=None)
    return base


def tiny_original_config(like: str, vocab_size: int, special_ids: dict, image_size: int = 56) -> dict:
    """The original InternVLChatConfig dict of a tiny ``like`` model."""
    family, template, vit, _ = SIZES[like]
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": dict(cfg.ORIGINAL_AUTO_MAP),
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": image_size,
        "llm_config": _llm_config(family, vocab_size, special_ids),
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": template,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": _vision_config(vit, image_size),
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
    """tokenizer.model + tokenizer_config.json of an InternLM2 / Phi-3 / Yi checkpoint; returns (vocab, special ids)."""
    import sentencepiece as spm

    in_model = {"internlm2": INTERNLM2_CHAT_TOKENS, "yi": ["<|im_start|>", "<|im_end|>"], "phi3": []}[style]
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
    if style == "internlm2":
        config.update(tokenizer_class="InternLM2Tokenizer", eos_token="</s>", pad_token="</s>",
                      additional_special_tokens=INTERNLM2_CHAT_TOKENS[::-1] + list(SPECIAL_TOKENS),
                      auto_map={"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]})
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
    if style == "qwen2":
        write_qwen2_tokenizer(out)
        return 151655, {"bos_token_id": 151643, "eos_token_id": 151645}
    if style == "llama3":
        return _write_llama3_tokenizer(out)
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


def write_tiny_checkpoint(like: str, out_dir: str | Path, seed: int = 0, image_size: int = 56) -> Path:
    """Write a tiny random ``like`` checkpoint (original layout, bf16) into ``out_dir`` and return its path.

    Args:
        like: one of ``internvl2-1b``, ``-2b``, ``-4b``, ``-8b``, ``-26b``, ``-40b``, ``-76b``.
        out_dir: target directory (created; must not hold another checkpoint).
        seed: seed of the random weights.
        image_size: tile size; 56 with patch 14 gives 4 image tokens per tile, 28 gives 1.
    """
    from internvl_tune.models.internvl_chat.loading import build_empty_model
    from internvl_tune.models.internvl_chat.saving import write_original_checkpoint

    if like not in SIZES:
        raise UserError(f"unknown --like {like!r}; choose one of {', '.join(SIZES)}")
    if image_size % 28:
        raise UserError(f"image_size must be a multiple of 28 (patch 14, pixel shuffle 0.5), got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family, _, _, style = SIZES[like]
    vocab_size, special_ids = write_tiny_tokenizer(style, out)
    original = tiny_original_config(like, vocab_size, special_ids, image_size)
    native = cfg.native_config(original, image_token_id=0)
    model = build_empty_model(native).to_empty(device="cpu")
    randomize_(model, seed)
    shards = 1 if like == "internvl2-1b" else 2  # the 1B release is one file; larger ones are sharded
    write_original_checkpoint(out, model.to(torch.bfloat16).state_dict(), original, num_shards=shards)
    _write_json(out / "generation_config.json", {"_from_model_config": True, **special_ids})
    return out
