"""Tiny random InternVL-14B-layout checkpoints for tests and demos.

``write_tiny_internvl14b(out_dir)`` writes what ``pretrained/InternVL-14B-224px`` holds, at toy size:

    config.json                      the reference keys (model_type "internvl", vision_config, qllama_config ...)
    model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json   the reference state-dict keys
    tokenizer.model                  a LLaMA-style sentencepiece BPE (byte fallback, ids unk 0 / bos 1 / eos 2),
    tokenizer_config.json            trained here at run time on a few English and Chinese captions
    special_tokens_map.json
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch

from internvl_tune.models.common.weights import write_shards
from internvl_tune.models.internvl_cg.config import InternVLCGConfig
from internvl_tune.models.internvl_cg.model import InternVLModel

# Text the tiny tokenizer learns its merges from: caption-like English and Chinese, plus the two prompt prefixes.
_CORPUS = [
    "summarize: a dog runs on the grass",
    "English caption: a man rides a bicycle down the street",
    "two young girls are playing in the park",
    "a woman in a red dress is walking her dog",
    "an astronaut in a white suit poses in front of a flag",
    "a cup of coffee on a saucer on a wooden table",
    "a cat with green eyes lies on a blanket",
    "a rocket stands on the launch pad under a blue sky",
    "a red motorcycle is parked next to a wall",
    "a group of people stand around a table eating food",
    "the boy jumps into the water at the beach",
    "一只狗在草地上奔跑",
    "一个男人骑着自行车在街上",
    "两个小女孩在公园里玩耍",
    "桌子上有一杯咖啡",
    "一只猫躺在毯子上",
    "a photo of 3 people and 12 birds, 2024.",
]


def train_tiny_sentencepiece(vocab_size: int = 400) -> bytes:
    """Train a LLaMA-style sentencepiece BPE model in memory and return its serialized bytes."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def tiny_config_dict(vocab_size: int, image_size: int = 28, num_query_token: int = 4) -> dict:
    """A config.json dict in the reference layout with toy sizes."""
    return {
        "architectures": ["InternVLModel"],
        "model_type": "internvl",
        "attn_pool_num_heads": 4,
        "clip_embed_dim": 32,
        "cross_attention_frequency": 2,
        "force_image_size": None,
        "hidden_size": 64,
        "initializer_range": 0.02,
        "label_smoothing": 0.0,
        "max_txt_len": 32,
        "num_query_token": num_query_token,
        "use_backbone_lora": 0,
        "use_qllama_lora": 0,
        "torch_dtype": "float32",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_size": 64,
            "image_size": image_size,
            "initializer_factor": 0.1,
            "initializer_range": 1e-10,
            "intermediate_size": 128,
            "layer_norm_eps": 1e-6,
            "num_attention_heads": 4,
            "num_channels": 3,
            "num_hidden_layers": 2,
            "patch_size": 14,
            "qk_normalization": True,
            "qkv_bias": False,
            "use_flash_attn": False,
        },
        "qllama_config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "hidden_act": "silu",
            "hidden_size": 64,
            "initializer_range": 0.02,
            "intermediate_size": 128,
            "max_position_embeddings": 256,
            "num_attention_heads": 4,
            "num_hidden_layers": 3,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": vocab_size,
        },
    }


@torch.no_grad()
def _randomize(model: InternVLModel, seed: int) -> None:
    """Give every tensor distinct random values (norm weights and layer scales too, so misplaced norms show)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("logit_scale"):
            p.fill_(math.log(1 / 0.07))
        elif name.endswith("bias"):
            p.copy_(0.02 * noise)
        elif "norm" in name.rpartition(".")[0].rpartition(".")[2]:
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith(("ls1", "ls2")):
            p.copy_(0.5 + 0.1 * noise)
        elif name.endswith(("query_tokens", "class_embedding", "position_embedding")):
            p.copy_(0.5 * noise)
        else:  # matrices: std ~ 1/sqrt(fan_in) keeps activations O(1) through the layers
            p.copy_(noise / math.sqrt(p.shape[-1]))


def write_tiny_internvl14b(
    out_dir: str | Path, seed: int = 0, image_size: int = 28, num_query_token: int = 4, num_shards: int = 2
) -> Path:
    """Write a tiny random checkpoint in the exact on-disk layout of InternVL-14B-224px; returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sp_bytes = train_tiny_sentencepiece()
    (out / "tokenizer.model").write_bytes(sp_bytes)
    import sentencepiece as spm

    vocab_size = spm.SentencePieceProcessor(model_proto=sp_bytes).get_piece_size()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, indent=2) + "\n")

    cfg_dict = tiny_config_dict(vocab_size, image_size=image_size, num_query_token=num_query_token)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    model = InternVLModel(InternVLCGConfig.from_dict(cfg_dict))
    _randomize(model, seed)
    write_shards(out, {k: v.clone() for k, v in sorted(model.state_dict().items())}, num_shards)
    return out
