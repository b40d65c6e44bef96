"""Peak GPU-memory estimate of a training run, printed before the first step.

Model states are exact byte counts; activations use per-token coefficients of a decoder layer that were fitted
to measured peaks on an H100 (see docs/performance.md for the measurements behind them).

Per rank, with ``W`` ranks (FSDP2 shards model states evenly):

- frozen parameters: their stored bytes / W (bf16 on GPUs; 4-bit NF4 weights about 0.52 bytes with their scales)
- trainable parameters: fp32 master (4 B) + fp32 gradient (4 B) + AdamW moments (8 B), all / W
- with CPU offload, FSDP2's shards live in host memory: no model states on the GPU (one rank: the frozen
  parameters, which FSDP leaves alone, still count)
- gathered parameters: several ranks: the largest blocks held unsharded in the compute dtype while they run (every
  block, from its forward to its backward, when blocks are not resharded after their forward: ZeRO-1/2 configs);
  one rank: a compute-dtype copy of every trainable parameter (``dist/parallelize.py``)
- activations, per LLM token and layer: a checkpointed layer keeps its input, ``a_ckpt * hidden`` bytes, and one
  layer at a time is recomputed with its full activations; an uncheckpointed layer keeps its full activations
  ``a_hidden * hidden + a_ffn * ffn`` (about half when compiled); a *selective* layer keeps the outputs of its
  matrix products and attention, ``a_sel_hidden * hidden + a_sel_ffn * ffn``; LoRA dropout keeps a dropped-out copy
  (bf16) and a mask (1 byte) of each adapted linear's input in every uncheckpointed layer; compiled blocks keep a
  share of their activations set by the compiler's memory budget (``BUDGET_CURVE``); plus the loss chunk's fp32
  logits.
- mixture-of-experts LLMs: every expert's weights are resident (model states count every parameter); activations
  follow the *active* width, ``ffn`` = experts per token x expert width, plus, per uncheckpointed layer and token,
  the routed copies of its input and of the experts' outputs (``top_k`` rows of ``hidden``, compute dtype) and the
  router's logits and probabilities (``MOE_ROUTER_BYTES`` per expert: the logits in the compute dtype, the fp32
  softmax of the routing and of the load-balancing loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from internvl_tune.dist.parallelize import memory_budget
from internvl_tune.models.common.quantize import stored_bytes

# bytes per token per unit of width, fitted on measurements (bf16 activations)
A_CKPT = 2.0
A_HIDDEN = 18.0
A_FFN = 6.0
# torch.compile'd blocks keep about half the activations of eager ones (fused norms/activations save fewer
# intermediates): 0.45 and 0.52 on the InternVL2-2B and -1B shapes, H100, 2026-11-23
COMPILED_ACTIVATIONS = 0.5
# selective checkpointing keeps q, k, v, o, attention, gate, up and down outputs: about 5 hidden + 2 ffn widths in bf16
A_SEL_HIDDEN = 10.0
A_SEL_FFN = 4.0
LORA_DROPOUT_BYTES = 3.0  # a bf16 copy and a bool mask of the input, per adapted linear
MOE_ROUTED_BYTES = 4.0  # per top-k slot and unit of hidden width: the gathered input row and the expert's output (bf16)
MOE_ROUTER_BYTES = 10.0  # per expert: the router logits (bf16) and two fp32 softmaxes (routing, load-balancing loss)
# Compiled blocks under an activation memory budget b keep about b**1.5 of what lies between full checkpointing and
# none: the partitioner drops the activations that are cheapest to recompute first (InternVL2-8B LoRA r16 on an H200,
# 2026-12-03: 21.7 / 39.3 / 72.2 GiB at b = 0 / 0.5 / 1)
BUDGET_CURVE = 1.5
WORKSPACE_GIB = 1.0  # CUDA context-independent allocator slack, cuBLAS workspaces
# --grad_checkpoint auto: the fractions of checkpointed blocks it tries, fastest first, and the headroom it keeps
# above an estimate (every measured peak lies within 15 % of its estimate: tests/train/test_memory.py)
AUTO_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
AUTO_MARGIN = 1.15


@dataclass
class MemoryEstimate:
    """Estimated peak memory of one rank, in GiB, by component."""

    model_states: float
    gathered_params: float
    activations: float
    logits: float
    workspace: float = WORKSPACE_GIB

    @property
    def total(self) -> float:
        return self.model_states + self.gathered_params + self.activations + self.logits + self.workspace

    def describe(self) -> str:
        return (f"estimated peak GPU memory per rank: {self.total:.1f} GiB (model states {self.model_states:.1f}, "
                f"gathered params {self.gathered_params:.1f}, activations {self.activations:.1f}, "
                f"logits {self.logits:.1f}, workspace {self.workspace:.1f})")


def _block_bytes(block: nn.Module, dtype_bytes: int) -> int:
    return sum(p.numel() for p in block.parameters()) * dtype_bytes


def estimate_training_memory(
    model: nn.Module,
    blocks: list[nn.Module],
    *,
    world_size: int,
    tokens_per_micro_batch: int,
    hidden: int,
    ffn: int,
    num_layers: int,
    grad_checkpoint: float | str,
    compiled: bool = False,
    compute_bytes: int = 2,
    loss_chunk: int = 2048,
    vocab: int = 0,
    lora_dropout_width: int = 0,
    vision: dict | None = None,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    moe: dict | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one rank for a decoder-style VLM training step.

    Args:
        model: the model with ``requires_grad`` already set (frozen parts counted as stored: ``stored_bytes``).
        blocks: the FSDP units below the root (vision blocks and LLM layers).
        world_size: ranks sharing the model states.
        tokens_per_micro_batch: LLM tokens in one micro-batch (rows x sequence length, or the packing budget).
        hidden, ffn, num_layers: LLM width, MLP width and depth.
        grad_checkpoint: the share of checkpointed layers (0.0 to 1.0) or ``"selective"``
            (``dist.parallelize.parse_grad_checkpoint``).
        compiled: the blocks run under ``torch.compile``.
        compute_bytes: bytes of the compute dtype (2 for bf16).
        loss_chunk, vocab: rows of fp32 logits alive at once in the chunked loss, and the vocabulary size.
        lora_dropout_width: per LLM layer, the summed input widths of the linears whose LoRA has dropout (0: none).
        vision: the ViT's ``hidden``, ``ffn``, ``num_layers`` and ``tokens`` per micro-batch when any of it trains
            (a frozen ViT runs without autograd and keeps no activations).
        reshard_after_forward: several ranks: blocks free their gathered parameters after their forward (False:
            every block stays gathered until its backward).
        cpu_offload: trainable parameters, gradients and optimizer state live in host memory.
        moe: a mixture-of-experts LLM's ``top_k`` and ``experts`` (``ffn`` is then the active width: top_k x the
            expert width).
    """
    gib = 2**30
    states = 0
    for p in model.parameters():
        if cpu_offload and (p.requires_grad or world_size > 1):  # FSDP2 keeps its shards in host memory (one
            continue                                              # rank: frozen parameters are not FSDP's)
        states += 16 * p.numel() if p.requires_grad else stored_bytes(p)
    states /= world_size
    if world_size > 1:  # one block at a time is gathered (two: the next one is prefetched), or all of them
        sizes = [_block_bytes(b, compute_bytes) for b in blocks]
        block_ids = {id(p) for b in blocks for p in b.parameters()}
        root = sum(p.numel() for p in model.parameters() if id(p) not in block_ids) * compute_bytes
        gathered = root + (2 * max(sizes, default=0) if reshard_after_forward else sum(sizes))
    else:  # one rank keeps compute copies of the trainable parameters; frozen ones are used as stored
        gathered = sum(p.numel() for p in model.parameters() if p.requires_grad) * compute_bytes
    t = tokens_per_micro_batch
    extra = LORA_DROPOUT_BYTES * lora_dropout_width
    if moe is not None:
        extra += MOE_ROUTED_BYTES * moe["top_k"] * hidden + MOE_ROUTER_BYTES * moe["experts"]
    acts = _activations(hidden, ffn, num_layers, t, grad_checkpoint, compiled, extra)
    if vision is not None:
        acts += _activations(vision["hidden"], vision["ffn"], vision["num_layers"], vision["tokens"], grad_checkpoint,
                             compiled, 0.0)
    logits = 3 * 4 * min(loss_chunk, t) * vocab  # fp32 logits, their softmax and gradient
    return MemoryEstimate(states / gib, gathered / gib, acts / gib, logits / gib)


def _activations(hidden: int, ffn: int, num_layers: int, tokens: int, grad_checkpoint: float | str, compiled: bool,
                 extra_per_token: float) -> float:
    """Bytes of activations a stack of ``num_layers`` blocks keeps for the backward (see the module docstring)."""
    kept = ((A_HIDDEN * hidden + A_FFN * ffn) * (COMPILED_ACTIVATIONS if compiled else 1.0) + extra_per_token) * tokens
    if compiled:  # the compiler's partitioner keeps a share of each block's activations (dist/parallelize.py)
        floor = A_CKPT * hidden * tokens * num_layers + kept
        return floor + (kept * num_layers - floor) * memory_budget(grad_checkpoint) ** BUDGET_CURVE
    if grad_checkpoint == "selective":
        return (A_SEL_HIDDEN * hidden + A_SEL_FFN * ffn) * tokens * num_layers + kept
    checkpointed = round(grad_checkpoint * num_layers)
    return A_CKPT * hidden * tokens * checkpointed + kept * (num_layers - checkpointed) + (kept if checkpointed else 0)


def choose_grad_checkpoint(estimate: Callable[[float], MemoryEstimate], available_gib: float
                           ) -> tuple[float, MemoryEstimate]:
    """``--grad_checkpoint auto``: the fewest checkpointed blocks whose estimate, plus 15 %, fits ``available_gib``.

    Args:
        estimate: the run's estimate for a fraction of checkpointed blocks (``estimate_training_memory``).
        available_gib: the GPU memory this rank may use (the smallest over ranks).

    Returns:
        ``(fraction, its estimate)``; every block checkpointed when no fraction fits.
    """
    for fraction in AUTO_FRACTIONS:
        chosen = estimate(fraction)
        if chosen.total * AUTO_MARGIN <= available_gib:
            return fraction, chosen
    return 1.0, chosen
