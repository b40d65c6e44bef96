"""Collectives used by losses and evaluation: gather-with-grad, ordered object gather, sums."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in forward; in backward each rank gets the sum over ranks of the gradient of its own slice.

    The sum (not the mean) is right because every rank's loss uses every gathered row, and the optimizer step
    afterwards averages gradients over ranks once more (FSDP/DDP), exactly as a single process with the whole batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order), keeping gradients; identity on one process.

    Every rank must pass the same number of rows.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place on a copy); identity on one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_object_ordered(items: list) -> list:
    """Concatenate per-rank lists of JSON-like objects in rank order (for contiguous evaluation shards)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items)
    boxes: list = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, list(items))
    return [x for box in boxes for x in box]
