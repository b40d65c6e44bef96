"""Next-token loss over supervised positions only, with the reference's per-token weights, chunked over rows;
per-sample sums of the answer tokens' log-probabilities (the preference losses' input); and per-token
log-probabilities with the entropy of each position's distribution (online RL's input).

The positions, targets and weights come from the batch (``data/batching.py``: ``supervised_positions``).

Only positions whose (shifted) label is supervised reach the LM head: prompts and image tokens, usually most of a
multimodal sequence, never pay for a 150k-wide logits row. Rows are processed in chunks under activation
checkpointing, so at most ``chunk x vocab`` fp32 logits exist at a time, forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _token_ce(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    logits = (hidden @ head.t())[:, :vocab].float()
    return F.cross_entropy(logits, targets, reduction="none")


def _token_log_prob_entropy(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                            vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden @ head.t())[:, :vocab].float()
    log_z = logits.logsumexp(dim=-1)
    log_prob = logits.gather(1, targets[:, None])[:, 0] - log_z
    with torch.no_grad():  # a logged number: no gradient, no saved activations
        entropy = log_z - (logits.softmax(dim=-1) * logits).sum(dim=-1)
    return log_prob, entropy


def _chunked_ce(hidden: torch.Tensor, head_weight: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
                chunk: int, fn=_token_ce):
    """Yield ``(rows, fn(rows))`` of the supervised positions, ``chunk`` rows at a time (``fn``: the cross-entropy of
    each row, by default)."""
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # backward: index_add, no host sync
    vocab = head_weight.shape[0]
    # Vocabularies such as 92553 or 151674 give logits rows that are not 16-byte aligned, and cuBLAS then falls
    # back to slow kernels; padding the head to a multiple of 64 rows keeps the fast ones (the pad is sliced off).
    head = F.pad(head_weight, (0, 0, 0, -vocab % 64))
    for start in range(0, h.shape[0], chunk):
        sl = slice(start, start + chunk)
        if torch.is_grad_enabled():
            yield sl, checkpoint(fn, h[sl], head, targets[sl], vocab, use_reentrant=False)
        else:
            yield sl, fn(h[sl], head, targets[sl], vocab)


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
    total = hidden.new_zeros((), dtype=torch.float32)
    for sl, ce in _chunked_ce(hidden, head_weight, index, targets, chunk):
        total = total + (ce * weights[sl]).sum()
    if index.shape[0] == 0:  # keep the graph connected so every rank runs the same backward
        total = total + 0.0 * hidden.sum()
    return total


def sample_log_prob_sums(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    index: torch.Tensor,
    targets: torch.Tensor,
    samples: torch.Tensor,
    num_samples: int,
    chunk: int = 2048,
) -> torch.Tensor:
    """Per sample, the sum of the log-probabilities of its supervised tokens: ``[num_samples]`` fp32.

    The preference losses' ``log pi(answer | prompt)``; computed in chunks like :func:`weighted_lm_loss_sum`, so the
    full logits never exist.

    Args:
        hidden, head_weight, index, targets, chunk: as for :func:`weighted_lm_loss_sum`.
        samples: [N] the sample of each supervised position (a batch's ``loss_sample``), in ``[0, num_samples)``.
    """
    sums = hidden.new_zeros((num_samples,), dtype=torch.float32)
    for sl, ce in _chunked_ce(hidden, head_weight, index, targets, chunk):
        sums = sums.index_add(0, samples[sl], -ce)
    if index.shape[0] == 0:
        sums = sums + 0.0 * hidden.sum()
    return sums


def token_log_probs(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    index: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of each supervised token and the entropy of the distribution it was drawn from:
    ``([N], [N])`` fp32, the entropy without gradient. Chunked like :func:`weighted_lm_loss_sum`.

    Args:
        hidden, head_weight, index, targets, chunk: as for :func:`weighted_lm_loss_sum`.
    """
    log_probs, entropies = [], []
    for _, (log_prob, entropy) in _chunked_ce(hidden, head_weight, index, targets, chunk, _token_log_prob_entropy):
        log_probs.append(log_prob)
        entropies.append(entropy)
    if not log_probs:  # no supervised token here: an empty result still connected to the graph
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return empty + 0.0 * hidden.sum(), empty
    return torch.cat(log_probs), torch.cat(entropies)
