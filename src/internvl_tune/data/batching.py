"""Batching: which samples share a micro-batch (samplers, packing) and how they are collated (typed batches).

- :class:`GlobalBatchSampler` and :class:`PackedBatchSampler` yield, per optimizer step, this rank's micro-batches
  of dataset indices. Every step consumes one *global batch* (``per_device_batch x world_size x grad_accum``
  samples, or ``world_size x grad_accum`` packs); the order of an epoch is a pure function of ``(seed, epoch)``, so a
  resume needs only the epoch and the steps already taken: nothing is re-read or skipped sample by sample.
- :class:`ChatCollator` pads samples into rows (:func:`pad_rows`, the reference's ``concat_pad_data_collator``) or
  packs them into one row whose positions restart at 0 for every sample (:func:`pack_rows`; each sample attends
  only to itself through :func:`cu_seqlens_from_positions` and ``models/common/varlen_attention.py``), and returns a
  :class:`ChatBatch` holding, besides the tensors, what the training step would otherwise compute on the GPU with a
  host sync (each ``nonzero`` or ``.item()`` there stalls the host until the GPU catches up, and the GPU then idles
  while the host queues the next kernels): the loss positions, targets, weights and samples
  (:func:`supervised_positions`), which tiles' features go to which tokens (:func:`image_layout`, which also rejects
  prompts whose image tokens do not match), the packed row's sample bounds, the batch's loss ``weight`` and its
  token count.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from internvl_tune.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from internvl_tune.errors import UserError


# ----------------------------------------------------------------------------------------------- samplers
class GlobalBatchSampler:
    """Yields, per optimizer step, this rank's ``grad_accum`` micro-batches (lists of dataset indices).

    With ``group_by_length`` the samples of an epoch are shuffled, cut into mega-batches of 8 global batches, and
    each mega-batch sorted by length (longest first) before being cut into global batches whose order is shuffled
    again; this keeps padding low while the order stays random, like the reference's length-grouped sampler.
    The last incomplete global batch is filled from the start of the epoch so every rank gets the same work.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        per_device_batch: int,
        world_size: int,
        rank: int,
        grad_accum: int,
        seed: int,
        group_by_length: bool = True,
    ):
        if len(lengths) == 0:
            raise ValueError("the dataset is empty")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.per_device_batch, self.world_size, self.rank = per_device_batch, world_size, rank
        self.grad_accum, self.seed, self.group_by_length = grad_accum, seed, group_by_length
        self.global_batch = per_device_batch * world_size * grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.global_batch)

    def global_order(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch`` (each a list of sample indices, rank-major within micro-steps)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g)
        need = self.steps_per_epoch * self.global_batch
        perm = perm[torch.arange(need) % len(perm)]  # wrap around; a global batch may exceed the dataset
        if self.group_by_length:
            mega = self.global_batch * 8
            chunks = []
            for start in range(0, len(perm), mega):
                chunk = perm[start : start + mega]
                chunks.append(chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)])
            perm = torch.cat(chunks)
        batches = perm.view(self.steps_per_epoch, self.global_batch)
        if self.group_by_length:
            batches = batches[torch.randperm(len(batches), generator=g)]
        return batches.tolist()

    def micro_batches(self, global_batch: list[int]) -> list[list[int]]:
        """This rank's ``grad_accum`` micro-batches out of one global batch."""
        b = self.per_device_batch
        out = []
        for micro in range(self.grad_accum):
            base = (micro * self.world_size + self.rank) * b
            out.append(global_batch[base : base + b])
        return out

    def epoch_steps(self, epoch: int, start_step: int = 0):
        """Yield ``(step_in_epoch, micro_batches)`` from ``start_step`` on."""
        order = self.global_order(epoch)
        for step in range(start_step, len(order)):
            yield step, self.micro_batches(order[step])


class PackedBatchSampler:
    """Yields, per optimizer step, this rank's ``grad_accum`` packs (lists of dataset indices).

    The packs are built once (seeded shuffle, then best-fit-decreasing bin packing inside windows of ``window``
    samples, so packs mix lengths yet stay full); every epoch visits them in a new seeded order. Each optimizer step
    takes ``world_size x grad_accum`` packs. A sample longer than the budget gets a pack of its own.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        world_size: int,
        rank: int,
        grad_accum: int,
        seed: int,
        tiles: Sequence[int] | None = None,
        max_tiles: int | None = None,
        window: int = 4096,
    ):
        if len(lengths) == 0:
            raise ValueError("the dataset is empty")
        self.lengths = [int(x) for x in lengths]
        self.tiles = [int(x) for x in tiles] if tiles is not None else [0] * len(self.lengths)
        self.max_tokens, self.max_tiles = max_tokens, max_tiles
        self.world_size, self.rank, self.grad_accum, self.seed = world_size, rank, grad_accum, seed
        self.packs_per_step = world_size * grad_accum
        self.fixed_packs = self._build(window)

    def _build(self, window: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        packs: list[list[int]] = []
        for start in range(0, len(perm), window):
            items = sorted(perm[start : start + window], key=lambda i: -self.lengths[i])
            free: list[tuple[int, int]] = []  # (free tokens, pack index), kept sorted for best fit
            for i in items:
                need = self.lengths[i]
                pos = bisect.bisect_left(free, (need, -1))
                placed = False
                if pos < len(free):
                    room, b = free[pos]
                    pack_tiles = sum(self.tiles[j] for j in packs[b])
                    if self.max_tiles is None or pack_tiles + self.tiles[i] <= self.max_tiles:
                        packs[b].append(i)
                        free.pop(pos)
                        bisect.insort(free, (room - need, b))
                        placed = True
                if not placed:
                    packs.append([i])
                    bisect.insort(free, (self.max_tokens - need, len(packs) - 1))
        return packs

    def packs(self, epoch: int) -> list[list[int]]:
        """All packs in the order of ``epoch``, the last step filled from the start (deterministic)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.fixed_packs), generator=g).tolist()
        packs = [self.fixed_packs[i] for i in order]
        fill = (-len(packs)) % self.packs_per_step  # may exceed len(packs) on a tiny dataset and many ranks
        return packs + [packs[i % len(packs)] for i in range(fill)]

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.fixed_packs) // self.packs_per_step)

    @property
    def global_batch(self) -> int:
        """Packs per optimizer step (all ranks and micro-steps)."""
        return self.packs_per_step

    def padding_waste(self) -> float:
        """Fraction of the packs' token budget left empty."""
        used = sum(self.lengths)
        return max(0.0, 1.0 - used / (len(self.fixed_packs) * self.max_tokens))

    def epoch_steps(self, epoch: int, start_step: int = 0):
        """Yield ``(step_in_epoch, micro_batches)`` for this rank, from ``start_step`` on."""
        packs = self.packs(epoch)
        for step in range(start_step, self.steps_per_epoch):
            base = step * self.packs_per_step
            yield step, [packs[base + micro * self.world_size + self.rank] for micro in range(self.grad_accum)]


def pack_rows(samples: list[dict]) -> dict:
    """Concatenate samples into one row: ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 for each
    sample) and ``sample_index``, each [1, total tokens]. A packed row has no padding and no attention mask."""
    return {
        "input_ids": torch.cat([s["input_ids"] for s in samples])[None],
        "labels": torch.cat([s["labels"] for s in samples])[None],
        "position_ids": torch.cat([torch.arange(len(s["input_ids"])) for s in samples])[None],
        "sample_index": torch.cat([torch.full((len(s["input_ids"]),), i) for i, s in enumerate(samples)])[None],
    }


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sample lengths (int32) and the longest sample of a packed row [1, L] whose positions restart at 0."""
    starts = (position_ids[0] == 0).nonzero().flatten()
    total = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# ----------------------------------------------------------------------------------------------- batches
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
        """Called by the DataLoader (``pin_memory=True``) so the host-to-GPU copies can be asynchronous.

        ``Tensor.pin_memory`` copies into a buffer with the source's strides, so a field that is an overlapping
        view (``expand``: several elements at one address) makes the copy fail ("more than one element of the
        written-to tensor refers to a single memory location"). Collators therefore return no such views;
        ``tests/data/test_pin_memory.py`` checks every batch kind for them on the CPU.
        """
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
    # a real [B, L] tensor, not an expanded view: pinning a view whose elements share memory fails (TensorBatch)
    sample_index = torch.arange(batch).repeat_interleave(longest).view(batch, longest)
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
        fields = self.fields(samples, samples, list(range(len(samples))))
        return ChatBatch(**fields, weight=float(fields["loss_weight"].sum()))

    def fields(self, rows: list[dict], samples: list[dict], owners: list[int]) -> dict:
        """The fields of a batch (all but ``weight``) whose token rows (``input_ids``, ``labels``) are ``rows`` and
        whose tiles are those of ``samples``: row ``i`` shows the tiles of ``samples[owners[i]]``, so rows may share
        one image's features (a preference pair's chosen and rejected answers)."""
        tokens = pack_rows(rows) if self.packed else pad_rows(rows, self.pad_token_id)
        image_flags = torch.cat([s["image_flags"] for s in samples])
        starts = torch.tensor([0] + [len(s["image_flags"]) for s in samples]).cumsum(0).tolist()
        row_tiles = torch.cat([torch.arange(starts[j], starts[j + 1]) for j in owners])  # tiles in row order
        layout = image_layout(tokens["input_ids"], image_flags[row_tiles], self.img_context_token_id,
                              self.num_image_token)
        layout["image_tiles"] = row_tiles[layout["image_tiles"]]
        packed = {}
        if self.packed:
            cu, longest = cu_seqlens_from_positions(tokens["position_ids"])
            packed = {"cu_seq_lens": cu, "max_length": longest}
        mask = tokens.pop("attention_mask", None)
        return dict(
            **tokens, attention_mask=mask, **packed, **layout,
            **supervised_positions(tokens["labels"], tokens["sample_index"], self.loss_reduction),
            pixel_values=torch.cat([s["pixel_values"] for s in samples]), image_flags=image_flags,
            sample_ids=[s.get("sample_id", "") for s in samples],
            num_tokens=int(mask.sum()) if mask is not None else tokens["input_ids"].numel(),
        )
