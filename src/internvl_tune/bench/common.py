"""Benchmark helpers: synthetic multimodal samples, the measured bf16 matmul peak, FLOP counts, timing."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from internvl_tune.constants import IGNORE_INDEX

TOKENS_PER_TILE = 256
VIT_TOKENS_PER_TILE = 1025  # 32 x 32 patches + CLS at 448 px


@dataclass
class SyntheticSample:
    """One training sample: ``tiles`` 448 px tiles and ``text`` text tokens (the second half supervised)."""

    tiles: int
    text: int

    @property
    def tokens(self) -> int:
        return self.tiles * TOKENS_PER_TILE + self.text


def synthetic_samples(n: int, seed: int = 0, tiles=(1, 7), text=(64, 1024)) -> list[SyntheticSample]:
    """``n`` samples with tile counts and text lengths uniform in the given inclusive ranges."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(tiles[0], tiles[1] + 1, (n,), generator=g).tolist()
    x = torch.randint(text[0], text[1] + 1, (n,), generator=g).tolist()
    return [SyntheticSample(a, b) for a, b in zip(t, x)]


def materialize(sample: SyntheticSample, image_token_id: int, vocab: int, seed: int, image_size: int = 448) -> dict:
    """Tensors of one sample: image tokens first, then text; labels on the second half of the text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, min(vocab, image_token_id) - 1, (sample.text,), generator=g)
    ids = torch.cat([torch.full((sample.tiles * TOKENS_PER_TILE,), image_token_id), text])
    labels = ids.clone()
    labels[: sample.tiles * TOKENS_PER_TILE + sample.text // 2] = IGNORE_INDEX
    pixels = torch.randn(sample.tiles, 3, image_size, image_size, generator=g)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels,
            "image_flags": torch.ones(sample.tiles, dtype=torch.long), "sample_id": str(seed)}


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU, where nothing is queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """bf16 TFLOP/s of an ``n^3`` matmul on random data (the MFU denominator, measured in the same run)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def param_counts(model) -> dict:
    """Parameters of a transformers ``InternVLForConditionalGeneration`` by part, for FLOP counts: ``llm`` (without
    the embedding table, a lookup; with the LM head), ``vit`` and ``proj``.

    A mixture-of-experts LLM counts its *active* parameters: each token runs through ``num_experts_per_tok`` of
    ``num_experts`` experts, so every expert tensor counts that share of its size (routers in full); MFU is then
    measured on the FLOPs the tokens need, as the MoE literature reports it."""
    from internvl_tune.models.common.moe import experts_modules

    lm = model.model.language_model
    emb = lm.embed_tokens.weight.numel()
    inactive = 0
    for _, experts in experts_modules(lm):
        share = 1 - lm.config.num_experts_per_tok / experts.num_experts
        inactive += share * sum(p.numel() for name, p in experts.named_parameters() if not name.startswith("lora_"))
    return {
        "llm": sum(p.numel() for p in lm.parameters()) - emb + model.lm_head.weight.numel() - int(inactive),
        "vit": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "proj": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
    }


def attention_width(text_config) -> int:
    """Width of the attention products, heads x head_dim: not the hidden size in every LLM (Qwen3-0.6B, 4B, 32B)."""
    head_dim = getattr(text_config, "head_dim", None)
    return text_config.num_attention_heads * head_dim if head_dim else text_config.hidden_size


def step_flops(counts: dict, text_config, samples: list[SyntheticSample], lora: bool = False) -> float:
    """Model FLOPs of training on ``samples`` (:func:`train_flops`); with ``lora`` the frozen LLM counts 4·N·T
    (forward + input gradients) instead of 6·N·T."""
    t = text_config
    tokens = sum(s.tokens for s in samples)
    flops = train_flops(counts["llm"], True, counts["vit"], counts["proj"], tokens, sum(s.tiles for s in samples),
                        t.num_hidden_layers, attention_width(t), [s.tokens for s in samples])
    return flops - (2 * counts["llm"] * tokens if lora else 0)


def train_flops(llm_params: int, trainable_llm: bool, vit_params: int, proj_params: int, llm_tokens: int, tiles: int,
                layers: int, hidden: int, seq_lens: list[int]) -> float:
    """FLOPs of one training step: 6·N·T for trained parameters, 2·N·T for frozen forward-only ones, plus attention.

    Attention (causal, per sample of length s): forward 2·2·s²/2·hidden per layer (QKᵀ and AV), x3 with backward;
    ``hidden`` is the attention width (:func:`attention_width`).
    Embedding-table lookups are not FLOPs and are excluded from ``llm_params`` by the caller.
    """
    llm = (6 if trainable_llm else 2) * llm_params * llm_tokens
    attn = sum(3 * 2 * s * s * hidden * layers for s in seq_lens)
    vit = 2 * vit_params * tiles * VIT_TOKENS_PER_TILE
    proj = 6 * proj_params * tiles * TOKENS_PER_TILE
    return float(llm + attn + vit + proj)


def phase_flops(counts: dict, text_config, samples: list[SyntheticSample], lora: bool) -> tuple[float, float]:
    """``(forward, backward)`` model FLOPs of training on ``samples``, the backward without any recomputation (the
    split of :func:`step_flops`): the frozen ViT runs forward only; the LLM's backward costs 4·N·T when it trains
    (input and weight gradients) and 2·N·T under LoRA (input gradients; LoRA's own matrices are negligible);
    attention's backward is twice its forward."""
    t = text_config
    tokens, tiles = sum(s.tokens for s in samples), sum(s.tiles for s in samples)
    attention = sum(2 * s.tokens * s.tokens * attention_width(t) * t.num_hidden_layers for s in samples)  # forward
    projector = 2 * counts["proj"] * tiles * TOKENS_PER_TILE
    forward = 2 * counts["llm"] * tokens + attention + 2 * counts["vit"] * tiles * VIT_TOKENS_PER_TILE + projector
    backward = (2 if lora else 4) * counts["llm"] * tokens + 2 * attention + (0 if lora else 2 * projector)
    return float(forward), float(backward)
