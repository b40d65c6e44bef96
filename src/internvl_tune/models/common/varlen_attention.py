"""Variable-length (packed) attention for transformers' decoder layers, registered as ``internvl_varlen``.

A packed row holds several samples; each must attend only to itself. transformers can express that with a dense
``[L, L]`` block-diagonal mask for SDPA, but the kernel then still computes every masked block. This backend
instead runs one causal attention per sample: PyTorch's flash-attention ``varlen_attn`` on CUDA (cumulative
sequence lengths, no wasted blocks), and one SDPA call per sample elsewhere (CPU tests).

It is registered through transformers' public ``AttentionInterface`` / ``AttentionMaskInterface`` (no patching).
The caller passes ``cu_seq_lens_q`` / ``max_length_q`` (transformers' flash-attention keyword names) to the
decoder's forward; without them (unpacked batches) the layer falls back to plain SDPA with the usual mask.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "internvl_varlen"


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sample lengths of a packed row [1, L] whose position ids restart at 0 for each sample."""
    starts = (position_ids[0] == 0).nonzero().flatten()
    total = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _find_varlen_kernel():
    """PyTorch's flash-attention ``varlen_attn`` and its parameter names, or ``(None, set())`` on older PyTorch."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, set()
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


# Looked up once at import, not inside the attention function: that runs in compiled regions, where a cached lookup
# makes dynamo warn about the cache wrapper on every compile.
VARLEN_KERNEL, VARLEN_PARAMS = _find_varlen_kernel()


def _per_sample_sdpa(q, k, v, cu: torch.Tensor, scaling) -> torch.Tensor:
    """Reference path: one causal SDPA per sample. q [L, Hq, D], k/v [L, Hkv, D] -> [L, Hq, D]."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, enable_gqa=ks.shape[1] != qs.shape[1])
        out[start:end] = o[0].transpose(0, 1)
    return out


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers attention function: query [B, Hq, L, D], key/value [B, Hkv, L, D] -> ([B, L, Hq, D], None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row per micro-batch")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [L, H, D]
    kernel, params = (VARLEN_KERNEL, VARLEN_PARAMS) if query.is_cuda else (None, set())
    if kernel is None:
        return _per_sample_sdpa(q, k, v, cu, scaling)[None], None
    max_len = kwargs["max_length_q"]
    extra = {"scale": scaling}
    if "window_size" in params:
        extra["window_size"] = (-1, 0)  # causal
    else:
        extra["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # older kernels: give every query head its own copy of its KV head
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = kernel(q, k, v, cu, cu, max_len, max_len, **extra)
    return out[None], None


def register() -> str:
    """Register the backend with transformers (idempotent); returns its name for ``config._attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # unpacked batches keep SDPA's padding/causal mask
    return NAME
