"""Variable-length (packed) attention for transformers' decoder layers, registered as ``internvl_varlen``.

A packed row holds several samples; each must attend only to itself. transformers can express that with a dense
``[L, L]`` block-diagonal mask for SDPA, but the kernel then still computes every masked block. This backend
instead runs one causal attention per sample: PyTorch's flash-attention ``varlen_attn`` on CUDA (cumulative
sequence lengths, no wasted blocks), and one SDPA call per sample elsewhere (CPU tests).

It is registered through transformers' public ``AttentionInterface`` / ``AttentionMaskInterface`` (no patching).
The caller passes ``cu_seq_lens_q`` / ``max_length_q`` (transformers' flash-attention keyword names) to the
decoder's forward; without them (unpacked batches) the layer falls back to plain SDPA with the usual mask.

**Sinks and sliding windows** (GPT-OSS): each head has a learned sink logit that joins every query's softmax and
then is dropped (it takes probability mass, attends to nothing), and every other layer attends to the last
``sliding_window`` tokens only. With ``p`` the attention without the sink and ``lse`` its log-sum-exp, the attention
with the sink is ``p * sigmoid(lse - sink)``, so any kernel that returns a differentiable log-sum-exp applies it:
on CUDA, FlexAttention (compiled) with a block mask of the packed samples, causal order and the window; elsewhere
the written-out softmax with the sink column (per sample for packed rows), as transformers' eager GPT-OSS attention
computes it.
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


def _sink_softmax_attention(q, k, v, allowed: torch.Tensor, scaling, sinks: torch.Tensor) -> torch.Tensor:
    """The written-out attention with a sink logit per head: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], ``allowed``
    [B or 1, 1, Lq, Lk] bool -> [B, Hq, Lq, D] (transformers' eager GPT-OSS attention, in fp32)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~allowed, float("-inf"))
    sink = sinks.float().reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    return (probs @ v.float()).to(q.dtype)


def _causal(lq: int, lk: int, window: int | None, device) -> torch.Tensor:
    """[lq, lk] True where query i (the last lq of lk positions) may see key j: causal, and within the window."""
    qi = torch.arange(lk - lq, lk, device=device)[:, None]
    kj = torch.arange(lk, device=device)[None, :]
    allowed = kj <= qi
    return allowed & (qi - kj < window) if window else allowed


def sample_ids(cu: torch.Tensor, length: int) -> torch.Tensor:
    """[length] the sample each position of a packed row belongs to. Comparisons and a sum, not ``searchsorted``:
    inductor's CUDA lowering of ``bucketize`` over a dynamic length failed inside the compiled GPT-OSS layers (H100,
    torch 2.11, 2026-12-06)."""
    return (cu[1:-1][None, :] <= torch.arange(length, device=cu.device)[:, None]).sum(dim=-1)


def _flex_sink_attention(q, k, v, cu: torch.Tensor, scaling, sinks: torch.Tensor, window: int | None):
    """Packed row on CUDA: FlexAttention over the samples (causal, windowed) and the sink through its log-sum-exp.
    q [L, Hq, D], k/v [L, Hkv, D] -> [L, Hq, D]."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask

    length = q.shape[0]
    sample = sample_ids(cu, length)

    def allowed(b, h, qi, kj):
        keep = (sample[qi] == sample[kj]) & (kj <= qi)
        return keep & (qi - kj < window) if window else keep

    mask = create_block_mask(allowed, None, None, length, length, device=q.device)
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
    out, aux = _flex()(qh, kh, vh, block_mask=mask, scale=scaling, enable_gqa=kh.shape[1] != qh.shape[1],
                       return_aux=AuxRequest(lse=True))
    out = out * torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1)).unsqueeze(-1).to(out.dtype)
    return out[0].transpose(0, 1)


_FLEX = []


def _flex():
    """FlexAttention, compiled once (uncompiled it materializes every score)."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention, dynamic=True))
    return _FLEX[0]


def sink_attention(query, key, value, attention_mask, scaling, sinks, window, cu=None) -> torch.Tensor:
    """Attention with sinks (and a window): query [B, Hq, L, D], key/value [B, Hkv, Lk, D] -> [B, L, Hq, D].

    ``cu``: the packed row's cumulative sample lengths (B = 1), else None and ``attention_mask`` is transformers'
    (bool or additive, [B, 1, L, Lk]; None: causal, windowed here)."""
    if cu is not None:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [L, H, D]
        if query.is_cuda:
            return _flex_sink_attention(q, k, v, cu, scaling, sinks, window)[None]
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            allowed = _causal(end - start, end - start, window, q.device)[None, None]
            qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
            out[start:end] = _sink_softmax_attention(qs, ks, vs, allowed, scaling, sinks)[0].transpose(0, 1)
        return out[None]
    if attention_mask is None:
        allowed = _causal(query.shape[2], key.shape[2], window, query.device)[None, None]
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:  # additive: -inf (or the dtype's minimum) where masked
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return _sink_softmax_attention(query, key, value, allowed, scaling, sinks).transpose(1, 2)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers attention function: query [B, Hq, L, D], key/value [B, Hkv, L, D] -> ([B, L, Hq, D], None)."""
    cu = kwargs.get("cu_seq_lens_q")
    sinks = kwargs.get("s_aux")
    if sinks is not None:  # GPT-OSS
        return sink_attention(query, key, value, attention_mask, scaling, sinks, kwargs.get("sliding_window"), cu), None
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
