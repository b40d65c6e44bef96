"""Next-token loss over supervised positions only, with the reference's per-token weights, chunked over rows.

Only positions whose (shifted) label is supervised reach the LM head: prompts and image tokens, usually most of a
multimodal sequence, never pay for a 150k-wide logits row. Rows are processed in chunks under activation
checkpointing, so at most ``chunk x vocab`` fp32 logits exist at a time, forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from internvl_tune.constants import IGNORE_INDEX


def token_weights(labels: torch.Tensor, sample_ids: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and weights of the supervised next-token predictions of a batch.

    Args:
        labels: [B, L] token labels, ``IGNORE_INDEX`` where not supervised.
        sample_ids: [B, L] id of the sample each token belongs to (unique across the batch; packing puts several
            samples in one row).
        reduction: "token" (weight 1), "sample" (1/n) or "square" (1/sqrt(n)), n = supervised tokens of the sample.

    Returns:
        ``(mask, weights)``: mask [B, L-1] of positions whose next token is supervised, weights [N] for them.
    """
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    # a prediction belongs to the sample of the token it predicts; never across a packed boundary
    mask &= sample_ids[:, 1:] == sample_ids[:, :-1]
    owners = sample_ids[:, 1:][mask]
    if reduction == "token":
        return mask, torch.ones(owners.shape, dtype=torch.float32, device=labels.device)
    _, inverse, counts = torch.unique(owners, return_inverse=True, return_counts=True)
    n = counts[inverse].float()
    if reduction == "sample":
        return mask, 1.0 / n
    if reduction == "square":
        return mask, n.rsqrt()
    raise ValueError(f"unknown loss reduction {reduction!r}")


def supervised_positions(labels: torch.Tensor, sample_ids: torch.Tensor, reduction: str) -> dict:
    """Where the loss is taken, as flat indices: what the model needs to score a batch without a host sync.

    Computed on the CPU by the collator (``train/chat_batch.py``), so the training step never turns a boolean mask
    into indices on the GPU (each such ``nonzero`` stalls the host until the GPU catches up).

    Returns:
        ``loss_index`` [N] positions ``b * L + p`` of hidden states that predict a supervised token,
        ``loss_target`` [N] the tokens they predict, ``loss_weight`` [N] their weights (see :func:`token_weights`).
    """
    mask, weights = token_weights(labels, sample_ids, reduction)
    rows, cols = mask.nonzero(as_tuple=True)
    return {"loss_index": rows * labels.shape[1] + cols, "loss_target": labels[rows, cols + 1], "loss_weight": weights}


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
        index, targets, weights: ``loss_index`` / ``loss_target`` / ``loss_weight`` of
            :func:`supervised_positions`.
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
