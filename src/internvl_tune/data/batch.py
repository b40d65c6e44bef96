"""Training batches of InternVL2 chat samples: padded (or packed) rows plus everything the step needs, as a
:class:`ChatBatch` built on the CPU in the data-loader workers.

Besides the collated tensors, a batch carries what the training step would otherwise compute on the GPU with a host
sync (each ``nonzero`` or ``.item()`` there stalls the host until the GPU catches up, and the GPU then idles while the
host queues the next kernels):

- ``loss_index`` / ``loss_target`` / ``loss_weight`` / ``loss_sample``: where the loss is taken
  (:func:`supervised_positions`);
- ``image_tiles`` / ``image_positions``: which tiles' features go to which tokens (:func:`image_layout`, which also
  rejects prompts whose image tokens do not match);
- ``cu_seq_lens`` / ``max_length`` for a packed row (per-sample varlen attention, ``data/packing.py``);
- ``weight`` (the loss normaliser of the micro-batch) and ``num_tokens`` (real tokens, for throughput).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from internvl_tune.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from internvl_tune.errors import UserError


class TensorBatch:
    """Base of the typed micro-batches: moving every tensor field at once, as the DataLoader and the step need.

    A batch also tells the step its ``weight`` (its share of the loss normaliser of the global batch) and its
    ``work`` (what throughput counts: tokens or samples).
    """

    def _map(self, fn):
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if torch.is_tensor(getattr(self, f.name))})

    def to(self, device: torch.device):
        """The batch on ``device`` (non-blocking copies from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self):
        """Called by the DataLoader (``pin_memory=True``) so the host-to-GPU copies can be asynchronous."""
        return self._map(torch.Tensor.pin_memory)


@dataclass
class ChatBatch(TensorBatch):
    """One micro-batch; tensors are ``[B, L]`` token rows unless noted (a packed row has ``B = 1``)."""

    input_ids: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX where not supervised
    position_ids: torch.Tensor  # 0..n-1 per sample (a packed row restarts at each sample)
    sample_index: torch.Tensor  # which sample of the batch each token belongs to
    attention_mask: torch.Tensor | None  # padded rows: True on real tokens; None for a packed row
    pixel_values: torch.Tensor  # [T, 3, S, S] every tile of the batch, in sample order
    image_flags: torch.Tensor  # [T] 1 for real tiles, 0 for the dummy tile of a pure-text sample
    image_tiles: torch.Tensor  # [T'] tiles whose features are used
    image_positions: torch.Tensor  # [T' * tokens per tile] flat positions (b * L + p) of <IMG_CONTEXT> tokens
    loss_index: torch.Tensor  # [N] flat positions of hidden states that predict a supervised token
    loss_target: torch.Tensor  # [N] the tokens they predict
    loss_weight: torch.Tensor  # [N] their weights (loss_reduction)
    loss_sample: torch.Tensor  # [N] the sample each of them belongs to
    sample_ids: list[str]  # "dataset:line" of each sample, for logs and errors
    cu_seq_lens: torch.Tensor | None = None  # [samples + 1] packed row: cumulative sample lengths
    max_length: int = 0  # packed row: the longest sample
    weight: float = 0.0  # sum of loss_weight: the micro-batch's share of the step's loss normaliser
    num_tokens: int = 0  # real (non-padding) tokens

    @property
    def packed(self) -> bool:
        return self.cu_seq_lens is not None

    @property
    def work(self) -> int:
        return self.num_tokens


def token_weights(labels: torch.Tensor, sample_index: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Which next-token predictions are supervised, and their weights.

    Args:
        labels: [B, L] token labels, ``IGNORE_INDEX`` where not supervised.
        sample_index: [B, L] sample of each token (unique across the batch).
        reduction: "token" (weight 1), "sample" (1/n) or "square" (1/sqrt(n)), n = supervised tokens of the sample.

    Returns:
        ``(mask, weights)``: mask [B, L-1] of positions whose next token is supervised, weights [N] for them.
    """
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    # a prediction belongs to the sample of the token it predicts; never across a packed boundary
    mask &= sample_index[:, 1:] == sample_index[:, :-1]
    owners = sample_index[:, 1:][mask]
    if reduction == "token":
        return mask, torch.ones(owners.shape, dtype=torch.float32, device=labels.device)
    _, inverse, counts = torch.unique(owners, return_inverse=True, return_counts=True)
    n = counts[inverse].float()
    if reduction == "sample":
        return mask, 1.0 / n
    if reduction == "square":
        return mask, n.rsqrt()
    raise ValueError(f"unknown loss reduction {reduction!r}")


def supervised_positions(labels: torch.Tensor, sample_index: torch.Tensor, reduction: str) -> dict:
    """Where the loss is taken, as flat indices (so the step never turns a mask into indices on the GPU).

    Returns:
        ``loss_index`` [N] positions ``b * L + p`` of hidden states that predict a supervised token,
        ``loss_target`` [N] the tokens they predict, ``loss_weight`` [N] their weights (:func:`token_weights`) and
        ``loss_sample`` [N] the sample each belongs to.
    """
    mask, weights = token_weights(labels, sample_index, reduction)
    rows, cols = mask.nonzero(as_tuple=True)
    return {"loss_index": rows * labels.shape[1] + cols, "loss_target": labels[rows, cols + 1],
            "loss_weight": weights, "loss_sample": sample_index[rows, cols + 1]}


def image_layout(input_ids: torch.Tensor, image_flags: torch.Tensor, img_context_token_id: int,
                 num_image_token: int) -> dict:
    """Which tiles carry features and where they go: ``image_tiles`` [T'] and ``image_positions`` [T' x n] indices.

    ``image_positions`` are flat positions (``b * L + p``) of the ``<IMG_CONTEXT>`` tokens, in order. Raises a
    ``UserError`` when the prompt's image tokens do not match the tiles (e.g. a truncated prompt).
    """
    tiles = image_flags.reshape(-1).nonzero().squeeze(1)
    positions = (input_ids.reshape(-1) == img_context_token_id).nonzero().squeeze(1)
    if len(positions) != len(tiles) * num_image_token:
        raise UserError(
            f"the prompt has {len(positions)} {IMG_CONTEXT_TOKEN} tokens but the images give "
            f"{len(tiles) * num_image_token} features ({len(tiles)} tiles x {num_image_token}); each image needs "
            f"exactly {IMG_CONTEXT_TOKEN} x {num_image_token} x its tiles — was the prompt truncated?"
        )
    return {"image_tiles": tiles, "image_positions": positions}


def pad_rows(samples: list[dict], pad_token_id: int) -> dict:
    """Right-pad samples to the longest (the reference's ``concat_pad_data_collator``).

    Returns ``input_ids`` (padded with ``pad_token_id``), ``labels`` (-100), ``position_ids`` (0 on padding),
    ``sample_index`` and ``attention_mask`` (True on real tokens), each [B, L].
    """
    if not samples:
        raise ValueError("pad_rows got an empty batch")
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
    sample_index = torch.arange(batch)[:, None].expand(batch, longest)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sample_index": sample_index,
            "attention_mask": attention_mask}


@dataclass(frozen=True)
class ChatCollator:
    """``collate_fn`` of chat training: pads (or packs) sample dicts into a :class:`ChatBatch`."""

    packed: bool
    pad_token_id: int
    img_context_token_id: int
    num_image_token: int
    loss_reduction: str = "token"

    def __call__(self, samples: list[dict]) -> ChatBatch:
        from internvl_tune.data.packing import cu_seqlens_from_positions, pack_rows

        rows = pack_rows(samples) if self.packed else pad_rows(samples, self.pad_token_id)
        image_flags = torch.cat([s["image_flags"] for s in samples])
        loss = supervised_positions(rows["labels"], rows["sample_index"], self.loss_reduction)
        packed = {}
        if self.packed:
            cu, longest = cu_seqlens_from_positions(rows["position_ids"])
            packed = {"cu_seq_lens": cu, "max_length": longest}
        mask = rows.pop("attention_mask", None)
        return ChatBatch(
            **rows, attention_mask=mask, **packed, **loss,
            pixel_values=torch.cat([s["pixel_values"] for s in samples]), image_flags=image_flags,
            **image_layout(rows["input_ids"], image_flags, self.img_context_token_id, self.num_image_token),
            sample_ids=[s.get("sample_id", "") for s in samples],
            weight=float(loss["loss_weight"].sum()),
            num_tokens=int(mask.sum()) if mask is not None else rows["input_ids"].numel(),
        )
