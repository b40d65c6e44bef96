"""Packing collator: several samples in one row, each attending only to itself.

The row carries ``position_ids`` that restart at 0 for every sample and no attention mask; transformers derives
per-sample (block-diagonal causal) attention from such position ids for SDPA, flex attention and flash attention,
so the native decoder layers need no patching. ``sample_ids`` tells the loss which sample each token belongs to.
"""

from __future__ import annotations

import torch


def pack_collate(samples: list[dict], pad_token_id: int = 0) -> dict:
    """Concatenate ``samples`` into one packed row.

    Args:
        samples: sample dicts (``input_ids``, ``labels``, ``pixel_values``, ``image_flags``, ``sample_id``).
        pad_token_id: unused (a packed row has no padding); kept so both collators share one signature.

    Returns:
        ``input_ids``, ``labels``, ``position_ids``, ``sample_ids`` of shape [1, total_tokens], the concatenated
        ``pixel_values`` / ``image_flags``, and ``sample_id`` (list of str).
    """
    del pad_token_id
    ids = torch.cat([s["input_ids"] for s in samples])[None]
    labels = torch.cat([s["labels"] for s in samples])[None]
    positions = torch.cat([torch.arange(len(s["input_ids"])) for s in samples])[None]
    owners = torch.cat([torch.full((len(s["input_ids"]),), i) for i, s in enumerate(samples)])[None]
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "sample_ids": owners,
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "image_flags": torch.cat([s["image_flags"] for s in samples]),
        "sample_id": [s.get("sample_id", "") for s in samples],
    }
