"""Chat training batches, collated and prepared on the CPU (in the data-loader workers).

Besides the collated tensors (``data.pad_collate`` or ``data.packing.pack_collate``), a batch carries what the
training step would otherwise compute on the GPU with a host sync (each ``nonzero`` or ``.item()`` there stalls
the host until the GPU catches up, and the GPU then idles while the host queues the next kernels):

- ``loss_index`` / ``loss_target`` / ``loss_weight``: where the loss is taken (``train.loss.supervised_positions``);
- ``image_tiles`` / ``image_positions``: which tiles' features go to which tokens
  (``models.internvl_chat.chat.image_layout``, which also rejects prompts whose image tokens do not match);
- ``cu_seq_lens`` / ``max_length`` for a packed row (per-sample varlen attention);
- ``num_tokens``: real (non-padding) tokens, for throughput.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from internvl_tune.data.collate import pad_collate
from internvl_tune.data.packing import pack_collate
from internvl_tune.models.internvl_chat.chat import image_layout
from internvl_tune.models.varlen_attention import cu_seqlens_from_positions
from internvl_tune.train.loss import supervised_positions


def sample_ids(batch: dict) -> torch.Tensor:
    """Per-token sample id: the packing collator provides it; with padding, one sample per row."""
    if "sample_ids" in batch:
        return batch["sample_ids"]
    b, length = batch["input_ids"].shape
    return torch.arange(b)[:, None].expand(b, length)


@dataclass(frozen=True)
class ChatCollator:
    """``collate_fn`` of the chat trainer: pads (or packs) samples, then :func:`prepare_chat_batch`."""

    packed: bool
    pad_token_id: int
    img_context_token_id: int
    num_image_token: int
    loss_reduction: str = "token"

    def __call__(self, samples: list[dict]) -> dict:
        collate = pack_collate if self.packed else pad_collate
        batch = collate(samples, pad_token_id=self.pad_token_id)
        return prepare_chat_batch(batch, self.img_context_token_id, self.num_image_token, self.loss_reduction)


def prepare_chat_batch(batch: dict, img_context_token_id: int, num_image_token: int, loss_reduction: str) -> dict:
    """Add the loss positions, image layout, packed-attention bounds and token count to a collated CPU batch."""
    batch.update(supervised_positions(batch["labels"], sample_ids(batch), loss_reduction))
    batch.update(image_layout(batch["input_ids"], batch["image_flags"], img_context_token_id, num_image_token))
    if "sample_ids" in batch:
        batch["cu_seq_lens"], batch["max_length"] = cu_seqlens_from_positions(batch["position_ids"])
    mask = batch.get("attention_mask")
    batch["num_tokens"] = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return batch
