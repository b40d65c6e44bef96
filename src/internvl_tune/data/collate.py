"""Padding collator: samples of different lengths -> one right-padded batch (the reference's concat_pad_data_collator)."""

from __future__ import annotations

import torch

from internvl_tune.constants import IGNORE_INDEX


def pad_collate(samples: list[dict], pad_token_id: int = 0) -> dict:
    """Right-pad ``samples`` to the longest one.

    Args:
        samples: sample dicts (``input_ids``, ``labels``, ``pixel_values``, ``image_flags``, ``sample_id``).
        pad_token_id: id written into the padding of ``input_ids``.

    Returns:
        ``input_ids`` / ``labels`` / ``position_ids`` / ``attention_mask`` of shape [B, L] (labels padded with -100,
        positions ``0..len-1`` per sample and 0 on padding, mask True on real tokens), ``pixel_values`` [sum T, 3, S, S]
        and ``image_flags`` [sum T] concatenated in sample order, and ``sample_id`` (list of str).
    """
    if not samples:
        raise ValueError("pad_collate got an empty batch")
    longest = max(len(s["input_ids"]) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, longest), dtype=torch.long)
    # The mask comes from the lengths, not from `input_ids != pad`: a real token may share the pad id.
    attention_mask = torch.zeros((batch, longest), dtype=torch.bool)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[row, :n] = s["input_ids"]
        labels[row, :n] = s["labels"]
        position_ids[row, :n] = torch.arange(n)
        attention_mask[row, :n] = True
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "image_flags": torch.cat([s["image_flags"] for s in samples]),
        "sample_id": [s.get("sample_id", "") for s in samples],
    }
