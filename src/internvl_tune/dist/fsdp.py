"""FSDP2 wrapping, applied from outside the model in a fixed order (as torchtitan does).

Order: activation checkpointing -> ``fully_shard`` on each vision block -> on each LLM decoder block -> the root.
The model file never mentions sharding.
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


def parallelize(
    model: nn.Module,
    *,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` with FSDP2 over the default process group.

    Args:
        model: the module to train, with trainable parameters in fp32 (they become the fp32 master weights).
        param_dtype: dtype the parameters are all-gathered in for compute (bf16 for mixed precision), or None
            to compute in the stored dtype. Gradients are always reduced in fp32.
        reshard_after_forward: free the gathered parameters after forward (saves memory on many GPUs; on one GPU
            ``False`` avoids gathering twice).

    Returns:
        The same module, now holding DTensor parameters.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # FSDP2 cannot shard 0-d parameters (e.g. InternVL's logit_scale): they stay replicated, and their gradients
    # are averaged over ranks by a hook instead
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for block in decoder_blocks(model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward, ignored_params=scalars)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward, ignored_params=scalars)
    if dist.get_world_size() > 1:
        for p in scalars:
            if p.requires_grad:
                p.register_hook(_average_over_ranks)
    return model


def _average_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad)  # SUM: gloo has no AVG
    return grad / dist.get_world_size()
