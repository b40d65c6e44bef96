"""Architecture shapes of the released InternVL2 and InternVL3.5 models, as transformers-native configs with random
weights.

Used by the benchmarks: the speed and memory of a shape do not depend on the weights' values.
"""

from __future__ import annotations

VIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                norm_type="layer_norm", use_qk_norm=False, attention_bias=True)
VIT_6B = dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
              norm_type="rms_norm", use_qk_norm=True, attention_bias=False)

# LLM shapes (InternLM2 maps exactly onto Llama; Qwen2 keeps its q/k/v biases)
LLMS = {
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, vocab_size=151674, rope_theta=1e6),
    "internlm2-1.8b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=8, intermediate_size=8192, vocab_size=92553, rope_theta=1e6),
    "phi3-mini": dict(model_type="phi3", hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=8192, vocab_size=32020),
    "internlm2.5-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, intermediate_size=14336, vocab_size=92553, rope_theta=1e6),
    "internlm2-20b": dict(model_type="llama", hidden_size=6144, num_hidden_layers=48, num_attention_heads=48,
                          num_key_value_heads=8, intermediate_size=16384, vocab_size=92553, rope_theta=1e6),
    "yi-34b": dict(model_type="llama", hidden_size=7168, num_hidden_layers=60, num_attention_heads=56,
                   num_key_value_heads=8, intermediate_size=20480, vocab_size=64000, rope_theta=5e6),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, intermediate_size=28672, vocab_size=128265, rope_theta=5e5),
}
# Qwen3 (InternVL3.5): head_dim 128 throughout, which is not hidden / heads in the 0.6B, 4B and 32B models; the
# vocabulary of the InternVL3.5 releases (Qwen3's 151,669 tokens + InternVL's 9)
_QWEN3 = dict(model_type="qwen3", num_key_value_heads=8, head_dim=128, vocab_size=151678, rope_theta=1e6)
LLMS.update({name: dict(_QWEN3, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn)
             for name, (hidden, layers, heads, ffn) in {
                 "qwen3-0.6b": (1024, 28, 16, 3072), "qwen3-1.7b": (2048, 28, 16, 6144), "qwen3-4b": (2560, 36, 32, 9728),
                 "qwen3-8b": (4096, 36, 32, 12288), "qwen3-14b": (5120, 40, 40, 17408),
                 "qwen3-32b": (5120, 64, 64, 25600)}.items()})

# Mixture-of-experts LLMs of InternVL3.5: Qwen3-30B-A3B, Qwen3-235B-A22B (128 experts, 8 per token) and gpt-oss-20b
# (32 experts, 4 per token, sinks, a 128-token window on every other layer; its vocabulary)
_QWEN3_MOE = dict(_QWEN3, model_type="qwen3_moe", num_key_value_heads=4, num_experts=128, num_experts_per_tok=8,
                  norm_topk_prob=True)
LLMS["qwen3-30b-a3b"] = dict(_QWEN3_MOE, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                             intermediate_size=6144, moe_intermediate_size=768)
LLMS["qwen3-235b-a22b"] = dict(_QWEN3_MOE, hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                               intermediate_size=12288, moe_intermediate_size=1536)
LLMS["gpt-oss-20b"] = dict(model_type="gpt_oss", hidden_size=2880, num_hidden_layers=24, num_attention_heads=64,
                           num_key_value_heads=8, head_dim=64, intermediate_size=2880, num_local_experts=32,
                           num_experts_per_tok=4, sliding_window=128, vocab_size=201088)

VIT_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                norm_type="layer_norm", use_qk_norm=False, attention_bias=True)
LLMS["tiny"] = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, vocab_size=1000)
LLMS["tiny-qwen3"] = dict(LLMS["tiny"], model_type="qwen3", head_dim=24)
LLMS["tiny-qwen3-moe"] = dict(LLMS["tiny-qwen3"], model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=32, norm_topk_prob=True)
LLMS["tiny-gpt-oss"] = dict(LLMS["tiny"], model_type="gpt_oss", head_dim=24, intermediate_size=32,
                            num_local_experts=8, num_experts_per_tok=2, sliding_window=4)

SHAPES = {
    "tiny": (VIT_TINY, "tiny"),  # CPU smoke tests of the benchmark code
    "tiny-qwen3": (VIT_TINY, "tiny-qwen3"),
    "tiny-qwen3-moe": (VIT_TINY, "tiny-qwen3-moe"),
    "tiny-gpt-oss": (VIT_TINY, "tiny-gpt-oss"),
    "internvl2-1b": (VIT_300M, "qwen2-0.5b"),
    "internvl2-2b": (VIT_300M, "internlm2-1.8b"),
    "internvl2-4b": (VIT_300M, "phi3-mini"),
    "internvl2-8b": (VIT_300M, "internlm2.5-7b"),
    "internvl2-26b": (VIT_6B, "internlm2-20b"),
    "internvl2-40b": (VIT_6B, "yi-34b"),
    "internvl2-76b": (VIT_6B, "llama3-70b"),
    "internvl3_5-1b": (VIT_300M, "qwen3-0.6b"),  # InternViT-300M-448px-V2_5 has the 300M shape
    "internvl3_5-2b": (VIT_300M, "qwen3-1.7b"),
    "internvl3_5-4b": (VIT_300M, "qwen3-4b"),
    "internvl3_5-8b": (VIT_300M, "qwen3-8b"),
    "internvl3_5-14b": (VIT_300M, "qwen3-14b"),
    "internvl3_5-38b": (VIT_6B, "qwen3-32b"),
    "internvl3_5-30b-a3b": (VIT_300M, "qwen3-30b-a3b"),
    "internvl3_5-241b-a28b": (VIT_6B, "qwen3-235b-a22b"),
    "internvl3_5-gpt-oss-20b-a4b": (VIT_300M, "gpt-oss-20b"),
}


def native_config(shape: str, attn_implementation: str = "sdpa", llm_layers: int | None = None):
    """A transformers ``InternVLConfig`` with the shape of ``shape`` (448 px tiles, 256 tokens per tile);
    ``llm_layers``: that many of the LLM's decoder layers (a model too large to run twice on one GPU, cut in depth)."""
    from transformers import InternVLConfig

    vit, llm = SHAPES[shape]
    text = dict(LLMS[llm], max_position_embeddings=32768, tie_word_embeddings=False)
    if llm_layers is not None:
        if not 0 < llm_layers <= text["num_hidden_layers"]:
            raise ValueError(f"{shape} has {text['num_hidden_layers']} LLM layers, not {llm_layers}")
        text["num_hidden_layers"] = llm_layers
    vision = dict(vit, image_size=[448, 448], patch_size=[14, 14], use_mean_pooling=True, layer_norm_eps=1e-6)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=text["vocab_size"] - 1,
                         downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=False)
    from internvl_tune.models.internvl_chat import families

    cfg._attn_implementation = attn_implementation
    # GPT-OSS runs with eager attention outside training (its sinks); training swaps in the varlen backend
    family = families.by_native_type(text["model_type"])
    cfg.text_config._attn_implementation = (family and family.attn_implementation) or attn_implementation
    cfg.vision_config._attn_implementation = "sdpa"
    return cfg
