"""QLLaMA: a LLaMA decoder whose first ``num_query_token`` positions are learnable queries that also cross-attend to
image features (every ``cross_attention_frequency``-th layer, starting at layer 0).

Plain PyTorch layers with the reference parameter names (``qllama.model.layers.{i}.self_attn.q_proj`` ...), wrapped
in a transformers ``PreTrainedModel`` + ``GenerationMixin`` so that HF's greedy and beam search (and its KV cache)
drive captioning exactly as they drive the reference's model. The caller prepends the queries as ``inputs_embeds``;
this module only needs to know how many there are (``config.num_query_token``).

Masks: a 2-D padding mask gets the usual causal structure; ``use_zero_attention_mask`` then lets the query block
attend to itself bidirectionally (captioning). Training passes ready-made 4-D additive masks instead (see
``InternVLModel.retrieval_attention_mask``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# The reference's rotary embedding has a fixed base and ignores any rope settings in the config.
ROPE_BASE = 10000.0

# transformers 5.24 renamed the KV cache argument of forward / prepare_inputs_for_generation and the output field
# from `past_key_values` to `cache`; both are accepted, and outputs and generation inputs use the installed name.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class QLlamaRMSNorm(nn.Module):
    """LLaMA RMSNorm as the reference computes it: variance in fp32, cast to the weight dtype if half."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, 1, L, head_dim]`` for integer positions, computed in fp32 then cast to ``dtype``."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, L, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def causal_padding_mask(
    mask2d: torch.Tensor, q_len: int, dtype: torch.dtype, zero_query_block: int = 0
) -> torch.Tensor:
    """Additive ``[B, 1, q_len, kv_len]`` mask from a 0/1 ``[B, kv_len]`` mask: causal over the last ``q_len`` keys.

    Masked entries hold ``finfo(dtype).min`` (never -inf, so a fully masked padding row softmaxes to finite values).
    ``zero_query_block`` > 0 opens the leading ``[n, n]`` block (queries see each other both ways).
    """
    bsz, kv_len = mask2d.shape
    past = kv_len - q_len
    neg = torch.finfo(dtype).min
    rows = torch.arange(q_len, device=mask2d.device)[:, None] + past
    cols = torch.arange(kv_len, device=mask2d.device)[None, :]
    blocked = (cols > rows)[None] | (mask2d[:, None, :] == 0)  # [B, q, kv]
    if zero_query_block:
        n = zero_query_block
        blocked[:, :n, :n] = False
    return torch.zeros(bsz, 1, q_len, kv_len, dtype=dtype, device=mask2d.device).masked_fill(blocked[:, None], neg)


class QLlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class QLlamaAttention(nn.Module):
    """Causal self-attention with rotary positions; keys/values go through a transformers ``Cache`` when given."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        dim = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, dim, bias=False)
        self.o_proj = nn.Linear(dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: Cache | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class QLlamaCrossAttention(nn.Module):
    """Queries (RMS-normed) attend to image features (RMS-normed over the vision width); no mask."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        dim, vdim = self.num_heads * self.head_dim, config.vision_hidden_size
        self.q_proj = nn.Linear(config.hidden_size, dim, bias=False)
        self.o_proj = nn.Linear(dim, config.hidden_size, bias=False)
        self.norm1 = QLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.k_proj = nn.Linear(vdim, dim, bias=False)
        self.v_proj = nn.Linear(vdim, dim, bias=False)
        self.norm2 = QLlamaRMSNorm(vdim, eps=config.rms_norm_eps)

    def forward(self, queries: torch.Tensor, vision: torch.Tensor, repeat_time: int = 1) -> torch.Tensor:
        B, Q, _ = queries.shape
        q = self.q_proj(self.norm1(queries)).view(B, Q, self.num_heads, self.head_dim).transpose(1, 2)
        vision = self.norm2(vision)
        Bv, N, _ = vision.shape
        k = self.k_proj(vision).view(Bv, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(vision).view(Bv, N, self.num_heads, self.head_dim).transpose(1, 2)
        # The query batch stacks `repeat_time` sub-tasks of the same images ([neg; pos; itc] in training):
        # project the image features once and tile them, as the reference does.
        k, v = k.repeat(repeat_time, 1, 1, 1), v.repeat(repeat_time, 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, Q, -1))


class QLlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, use_cross_attn: bool):
        super().__init__()
        self.self_attn = QLlamaAttention(config, layer_idx)
        self.cross_attn = QLlamaCrossAttention(config) if use_cross_attn else None
        self.mlp = QLlamaMLP(config)
        self.input_layernorm = QLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = QLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.num_query_token = config.num_query_token

    def forward(self, x, cos, sin, mask, vision=None, cache=None, repeat_time: int = 1) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if self.cross_attn is not None and vision is not None:
            # Only the query positions read the image; text positions pass through unchanged.
            n = self.num_query_token
            queries = x[:, :n]
            queries = queries + self.cross_attn(queries, vision, repeat_time)
            x = torch.cat([queries, x[:, n:]], dim=1)
        return x + self.mlp(self.post_attention_layernorm(x))


class QLlamaModel(nn.Module):
    """Embeddings + decoder layers + final norm; returns the normed last hidden state."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        freq = config.cross_attention_frequency
        self.layers = nn.ModuleList(
            QLlamaDecoderLayer(config, i, use_cross_attn=i % freq == 0) for i in range(config.num_hidden_layers)
        )
        self.norm = QLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        repeat_time: int = 1,
    ) -> torch.Tensor:
        """Run the decoder.

        Args:
            inputs_embeds: ``[B, L, H]`` (queries first when images are used).
            attention_mask: additive ``[B, 1, L, past + L]``.
            position_ids: ``[B, L]``; default ``past .. past + L - 1``.
            vision_hidden_states: ``[B / repeat_time, N, vision_hidden]`` image features for the cross-attention,
                used only on the first forward of a sequence (no cached past), when the queries are present.
            cache: a transformers ``Cache`` (generation) or None.
            repeat_time: how many sub-task copies of each image the batch stacks.
        """
        B, L, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + L, device=inputs_embeds.device).expand(B, L)
        if vision_hidden_states is not None:
            if past:
                vision_hidden_states = None  # decoding steps: the queries were read (and cached) in the prefill
            elif L < self.config.num_query_token:
                raise ValueError(f"image features given but the sequence ({L}) is shorter than the query block")
        cos, sin = rotary_cos_sin(position_ids, self.config.hidden_size // self.config.num_attention_heads, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:  # (activation checkpointing wraps the layers from outside: dist/parallelize.py)
            x = layer(x, cos, sin, attention_mask, vision_hidden_states, cache, repeat_time)
        return self.norm(x)


class QLlamaForCausalLM(PreTrainedModel, GenerationMixin):
    """QLLaMA with its LM head; ``generate`` is transformers' (greedy, beam search, KV cache)."""

    config_class = LlamaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = QLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def _init_weights(self, module):  # weights come from checkpoints or from the tiny-model writer
        pass

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        use_zero_attention_mask: bool = False,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """LM logits. ``attention_mask`` is a 0/1 ``[B, past + L]`` mask or an additive ``[B, 1, L, past + L]`` one.

        The KV cache comes as ``cache`` or, from transformers before the rename, ``past_key_values``.
        """
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        B, L, _ = inputs_embeds.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + L, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask.ndim == 2:
            zero_block = self.config.num_query_token if use_zero_attention_mask and past == 0 else 0
            attention_mask = causal_padding_mask(attention_mask, L, inputs_embeds.dtype, zero_block)
        hidden = self.model(inputs_embeds, attention_mask, position_ids, vision_hidden_states, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), **{CACHE_FIELD: cache})

    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        vision_hidden_states=None,
        use_zero_attention_mask=False,
        past_key_values=None,
        **kwargs,
    ) -> dict:
        """Prefill with the prompt embeddings (queries + prompt), then one new token per step.

        Positions come from the running 0/1 mask (``cumsum - 1``), so left-padded prompts get the same positions
        as unpadded ones.
        """
        cache = cache if cache is not None else past_key_values
        decoding = cache is not None and cache.get_seq_length() > 0
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        inputs = {
            CACHE_FIELD: cache,
            "attention_mask": attention_mask,
            "vision_hidden_states": vision_hidden_states,
            "use_zero_attention_mask": use_zero_attention_mask,
            "use_cache": kwargs.get("use_cache", True),
        }
        if decoding:
            inputs["input_ids"] = input_ids[:, -1:]
            inputs["position_ids"] = position_ids[:, -1:] if position_ids is not None else None
        elif inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
            inputs["position_ids"] = position_ids
        else:
            inputs["input_ids"] = input_ids
            inputs["position_ids"] = position_ids
        if kwargs.get("logits_to_keep"):
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
