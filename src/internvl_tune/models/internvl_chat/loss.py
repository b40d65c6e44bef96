"""Next-token loss over supervised positions only, with the reference's per-token weights, chunked over rows.

The positions, targets and weights come from the batch (``data/batching.py``: ``supervised_positions``).

Only positions whose (shifted) label is supervised reach the LM head: prompts and image tokens, usually most of a
multimodal sequence, never pay for a 150k-wide logits row. Rows are processed in chunks under activation
checkpointing, so at most ``chunk x vocab`` fp32 logits exist at a time, forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _weighted_ce_sum(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                     vocab: int) -> torch.Tensor:
    logits = (hidden @ head.t())[:, :vocab].float()
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()


def weighted_lm_loss_sum(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    index: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk: int = 2048,
) -> torch.Tensor:
    """Sum over supervised positions of ``weight x cross-entropy``; divide by the global weight sum outside.

    Args:
        hidden: [B, L, H] final hidden states (after the last norm).
        head_weight: [V, H] LM-head weight.
        index, targets, weights: a batch's ``loss_index`` / ``loss_target`` / ``loss_weight``.
        chunk: rows of logits computed at once.
    """
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # backward: index_add, no host sync
    vocab = head_weight.shape[0]
    # Vocabularies such as 92553 or 151674 give logits rows that are not 16-byte aligned, and cuBLAS then falls
    # back to slow kernels; padding the head to a multiple of 64 rows keeps the fast ones (the pad is sliced off).
    head = F.pad(head_weight, (0, 0, 0, -vocab % 64))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        sl = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(_weighted_ce_sum, h[sl], head, targets[sl], weights[sl], vocab,
                                       use_reentrant=False)
        else:
            total = total + _weighted_ce_sum(h[sl], head, targets[sl], weights[sl], vocab)
    if h.shape[0] == 0:  # keep the graph connected so every rank runs the same backward
        total = total + 0.0 * hidden.sum()
    return total
