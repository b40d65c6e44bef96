"""FSDP2 wrapping, applied from outside the model in a fixed order (as torchtitan does).

Order: activation checkpointing -> ``torch.compile`` of each block -> ``fully_shard`` on each vision block -> on
each LLM decoder block -> the root (several ranks; one rank needs only the root). The model file never mentions
sharding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of any model we train (vision blocks first, then LLM layers).

    Found by structure, not by class name: every ``nn.ModuleList`` whose children are all of one class.
    """
    blocks: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and any(p.numel() for p in module[0].parameters()):
                blocks.extend(module)
    return blocks


def parallelize(model: nn.Module, *, param_dtype: torch.dtype | None) -> nn.Module:
    """Shard ``model`` with FSDP2 over the default process group.

    Several ranks: one FSDP unit per block, gathered for its forward and backward and freed in between (memory
    scales down with the ranks). One rank: nothing to shard, so one unit over the trainable parameters, kept
    gathered, and frozen parameters left out of FSDP in their stored dtype: no per-block hooks, no copies of frozen
    weights (a LoRA run keeps one copy of the base model).

    Args:
        model: the module to train, with trainable parameters in fp32 (they become the fp32 master weights).
        param_dtype: dtype the parameters are all-gathered in for compute (bf16 for mixed precision), or None
            to compute in the stored dtype. Gradients are always reduced in fp32.

    Returns:
        The same module, now holding DTensor parameters (the trainable ones, on one rank).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # FSDP2 cannot shard 0-d parameters (e.g. InternVL's logit_scale): they stay replicated, and their gradients
    # are averaged over ranks by a hook instead
    ignored = {p for p in model.parameters() if p.ndim == 0}
    several = dist.get_world_size() > 1
    if several:
        for block in decoder_blocks(model):
            fully_shard(block, mp_policy=policy, reshard_after_forward=True, ignored_params=ignored)
    else:
        ignored |= {p for p in model.parameters() if not p.requires_grad}
    fully_shard(model, mp_policy=policy, reshard_after_forward=several, ignored_params=ignored)
    if several:
        for p in ignored:
            if p.requires_grad:
                p.register_hook(_average_over_ranks)
    return model


def _average_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad)  # SUM: gloo has no AVG
    return grad / dist.get_world_size()


def materialize_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give a model sharded on the meta device its weights: rank 0 holds them all, the others hold none.

    Each rank allocates only its own shards on ``device``; rank 0 broadcasts ``full_state`` (the model's full state
    dict, on its CPU) tensor by tensor, and every rank keeps its slice. So N ranks hold one full copy of the
    checkpoint in host memory between them, not N. Buffers, built for real on every rank, keep their values.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    set_model_state_dict(model, full_state if dist.get_rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

