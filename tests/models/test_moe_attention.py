"""GPT-OSS attention in training: attention sinks and the sliding window of every other layer inside the packed
varlen backend equal transformers' own eager GPT-OSS attention on the unpacked rows (outputs and gradients), padded
batches too; the log-sum-exp form of the sink (the CUDA path) equals the written-out softmax with the sink column."""

from __future__ import annotations

import pytest
import torch

from internvl_tune.models.common import varlen_attention
from internvl_tune.models.common.varlen_attention import cu_seqlens_from_positions


def _gpt_oss(window: int = 3):
    from transformers import GptOssConfig, GptOssModel

    config = GptOssConfig(vocab_size=32, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=window)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = GptOssModel(config).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def lengths():
    return [5, 9, 4]  # longer and shorter than the window


def test_packed_sinks_and_window_equal_eager_on_unpacked_rows(lengths):
    model = _gpt_oss()
    torch.manual_seed(1)
    embeds = [torch.randn(1, n, 32, requires_grad=True) for n in lengths]
    model.set_attn_implementation("eager")
    expected = [model(inputs_embeds=e).last_hidden_state for e in embeds]
    params = [p for name, p in model.named_parameters() if "embed_tokens" not in name]
    grads = torch.autograd.grad(sum((x * x.detach()).sum() for x in expected), [*embeds, *params])

    model.set_attn_implementation(varlen_attention.register())
    packed = torch.cat(embeds, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu, longest = cu_seqlens_from_positions(positions)
    out = model(inputs_embeds=packed, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=longest, max_length_k=longest).last_hidden_state
    torch.testing.assert_close(out, torch.cat(expected, dim=1), atol=1e-5, rtol=0)
    got = torch.autograd.grad((out * out.detach()).sum(), [*embeds, *params])
    for a, b in zip(got, grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_padded_rows_with_sinks_equal_eager(lengths):
    model = _gpt_oss()
    torch.manual_seed(2)
    embeds = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    model.set_attn_implementation("eager")
    expected = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    model.set_attn_implementation(varlen_attention.register())
    out = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :6], expected[1, :6], atol=1e-5, rtol=0)


def test_the_sink_through_the_log_sum_exp_equals_the_sink_column():
    """out * sigmoid(lse - sink) (what the CUDA path computes from FlexAttention's lse) = softmax with the sink
    column: forward and gradients, written out here without the kernel."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 7, 8, requires_grad=True) for _ in range(3))
    sinks = torch.randn(2, requires_grad=True)
    allowed = varlen_attention._causal(7, 7, 3, "cpu")[None, None]
    expected = varlen_attention._sink_softmax_attention(q, k, v, allowed, 0.3, sinks)
    logits = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
    lse = logits.logsumexp(-1)
    out = (logits.softmax(-1) @ v) * torch.sigmoid(lse - sinks.view(1, -1, 1)).unsqueeze(-1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, sinks), g), torch.autograd.grad(expected, (q, k, v, sinks), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without")
def test_flex_block_mask_of_the_cuda_path_matches_per_sample_attention(lengths):
    """The CUDA path's FlexAttention call and block mask, run unfused on the CPU (no gradients there)."""
    torch.manual_seed(4)
    total = sum(lengths)
    q, k, v = torch.randn(total, 4, 8), torch.randn(total, 2, 8), torch.randn(total, 2, 8)
    sinks = torch.randn(4)
    cu = torch.tensor([0, 5, 14, 18], dtype=torch.int32)
    from torch.nn.attention.flex_attention import flex_attention

    varlen_attention._FLEX[:] = [flex_attention]  # unfused: the CPU runs it without compiling
    try:
        got = varlen_attention._flex_sink_attention(q, k, v, cu, 0.25, sinks, 3)
    finally:
        varlen_attention._FLEX.clear()
    expected = varlen_attention.sink_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], None, 0.25, sinks, 3, cu=cu)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_sample_ids_of_a_packed_row_without_searchsorted():
    # by hand: samples of 3, 1 and 4 tokens
    cu = torch.tensor([0, 3, 4, 8])
    assert varlen_attention.sample_ids(cu, 8).tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    # inductor's CUDA lowering of bucketize over a dynamic length failed in the compiled GPT-OSS layers (H100,
    # 2026-12-06): the ids, compiled with dynamic shapes as the layers are, hold no searchsorted / bucketize
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(varlen_attention.sample_ids, backend=recording, dynamic=True)
    assert compiled(torch.tensor([0, 5, 9, 20]), 20).tolist() == [0] * 5 + [1] * 4 + [2] * 11
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
    assert graphs and not [o for o in ops if "searchsorted" in o or "bucketize" in o], ops
