"""``parallelize``: activation checkpointing -> ``torch.compile`` -> FSDP2, applied from outside the model in that order,
as torchtitan's ``parallelize`` does per model. The model files never mention any of it.

- **Activation checkpointing**, eager: each repeated block (ViT blocks, LLM layers) is wrapped in a checkpoint
  wrapper. Modes: every block, a fraction of the blocks (spread evenly), or *selective*: every block, but the
  outputs of matrix products and attention are kept (only the cheap element-wise work is recomputed).
- **Compilation** of each block with ``dynamic=True``: packed rows and tile counts change every step, and a
  symbolic length keeps one graph for all of them. Identical blocks share the graph. Inductor fuses what eager mode
  runs as separate kernels (RMSNorm, RoPE, SwiGLU, residual adds, dtype casts). A compiled run checkpoints *inside*
  the compiled region: the compiler's partitioner decides what each block's backward recomputes, under an
  activation memory budget (0 = recompute all it can, as full checkpointing; 0.5 for *selective* or half the blocks;
  1 = none). It sees every random op (LoRA dropout, drop path) and never recomputes one, which checkpoint wrappers
  around or inside compiled blocks cannot do ("A different number of tensors was saved during the original forward
  and recomputation" on InternVL2-8B LoRA with torch 2.x; "does not support RNG ops in recompute regions").
- **FSDP2**: several ranks: ``fully_shard`` on each block, then the root; one rank: one unit over the trainable
  parameters, kept gathered, and frozen parameters left out of FSDP in their stored dtype (no copies of frozen
  weights: a LoRA run holds the base model once). ``reshard_after_forward`` (ZeRO-3's choice, the default) frees a
  block's gathered parameters after its forward; False keeps them until its backward (ZeRO-2's memory and traffic).
  ``cpu_offload`` (FSDP2's ``CPUOffloadPolicy``) keeps the sharded parameters, their gradients and the optimizer
  step on the CPU (``--deepspeed`` files with ``offload_optimizer`` / ``offload_param``: ``train/deepspeed.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from internvl_tune.errors import UserError

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
RECOMPILE_LIMIT = 32  # graphs per compiled code object (see parallelize)


def clean_name(name: str) -> str:
    """A parameter name without the prefixes checkpoint wrappers and compilation add (the checkpoint's name)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def parse_grad_checkpoint(value) -> float | str:
    """``--grad_checkpoint``: True/False, a fraction in (0, 1] of the blocks, ``selective`` or ``auto``.

    Returns:
        ``"selective"``, ``"auto"`` (the trainer picks a fraction: ``train.memory.choose_grad_checkpoint``) or the
        fraction of blocks to checkpoint (1.0 = all, 0.0 = none).
    """
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("true", "yes", "1", "on", "full"):
        return 1.0
    if text in ("false", "no", "0", "off", "none"):
        return 0.0
    if text == "selective":
        return "selective"
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"--grad_checkpoint {value!r}: use True, False, a fraction between 0 and 1 (e.g. 0.5), "
                        "selective or auto")
    return fraction


def checkpointed(count: int, fraction: float) -> list[bool]:
    """Which of ``count`` blocks to checkpoint so that ``fraction`` of them are, spread evenly."""
    return [int((i + 1) * fraction) > int(i * fraction) for i in range(count)]


def _selective_context() -> Callable:
    """Context functions for selective activation checkpointing: keep the outputs of matmuls and attention."""
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    keep = {aten.mm.default, aten.addmm.default, aten.bmm.default,
            aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_cudnn_attention.default}
    if hasattr(aten, "_flash_attention_forward"):
        keep.add(aten._flash_attention_forward.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return partial(create_selective_checkpoint_contexts, policy)


def _parent_lists(module: nn.Module) -> dict[int, tuple[nn.ModuleList, int]]:
    """``id(child) -> (its ModuleList, index)`` for every child of every ``ModuleList`` in ``module``."""
    return {id(child): (parent, i) for parent in module.modules() if isinstance(parent, nn.ModuleList)
            for i, child in enumerate(parent)}


def apply_activation_checkpointing(module: nn.Module, blocks: list[nn.Module], mode: float | str) -> list[nn.Module]:
    """Replace blocks, in their parent ``ModuleList``, by checkpoint wrappers (a :func:`parse_grad_checkpoint` mode).

    Returns:
        The blocks as they now sit in the model (wrapped where checkpointed).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == 0.0:
        return list(blocks)
    fraction = 1.0 if mode == "selective" else mode
    extra = {"context_fn": _selective_context()} if mode == "selective" else {}
    parents = _parent_lists(module)
    out = []
    for block, chosen in zip(blocks, checkpointed(len(blocks), fraction)):
        if chosen:
            parent, index = parents[id(block)]
            parent[index] = block = checkpoint_wrapper(block, **extra)  # non-reentrant, RNG state preserved
        out.append(block)
    return out


def memory_budget(mode: float | str) -> float:
    """The compiler's activation memory budget for a :func:`parse_grad_checkpoint` mode (the share of activations
    kept: 0.0 recomputes all it can, 1.0 none)."""
    return 0.5 if mode == "selective" else 1.0 - mode


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``--torch_compile``: "True", "False", or "auto" (on for CUDA devices)."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "True"


def parallelize(module: nn.Module, blocks: list[nn.Module], *, world_size: int, param_dtype: torch.dtype | None,
                grad_checkpoint: float | str = 0.0, compile: bool = False, reshard_after_forward: bool = True,
                cpu_offload: bool = False, pin_memory: bool = True) -> list[nn.Module]:
    """Apply activation checkpointing, compilation and FSDP2 to ``module`` in place.

    Args:
        module: the training module (its trainable parameters in fp32: they become the fp32 master weights).
        blocks: its repeated blocks (vision blocks first, then LLM layers), each a direct child of a ``ModuleList``.
        world_size: ranks of the default process group sharing the model.
        param_dtype: dtype parameters are gathered in for compute (bf16 for mixed precision), or None for the stored
            dtype. Gradients are always reduced in fp32.
        grad_checkpoint: a :func:`parse_grad_checkpoint` value.
        compile: ``torch.compile`` every block.
        reshard_after_forward: several ranks: free each block's gathered parameters after its forward (True) or
            keep them until its backward (False).
        cpu_offload: FSDP2's ``CPUOffloadPolicy``: sharded parameters, gradients and the optimizer step on the CPU
            (the process group needs a CPU backend too: ``dist.init_distributed(cpu_collectives=True)``).
        pin_memory: pin the offloaded tensors (faster copies; uses page-locked host memory).

    Returns:
        The blocks as they now sit in the model (wrapped where checkpointed).
    """
    if compile:
        import torch._dynamo.config as dynamo_config
        import torch._functorch.config as functorch_config

        # the partitioner of every compiled block's forward + backward reads it when the block first runs
        functorch_config.activation_memory_budget = memory_budget(grad_checkpoint)
        # Every block kind (ViT layer, LLM layer) shares one compiled code object (transformers' layer forward), and
        # each way a run calls it is one graph: trained (first LLM layer and the others: their input needs grad or
        # not), a reference pass (no grad, eval mode, LoRA off), generation. Preference tuning needs 6 on the CPU;
        # past dynamo's default limit of 8 the next ones would silently run uncompiled.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        for block in blocks:
            block.compile(dynamic=True)
    else:
        blocks = apply_activation_checkpointing(module, blocks, grad_checkpoint)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # FSDP2 cannot shard 0-d parameters (e.g. InternVL's logit_scale): they stay replicated, and their gradients
    # are averaged over ranks by a hook instead
    ignored = {p for p in module.parameters() if p.ndim == 0}
    offload = CPUOffloadPolicy(pin_memory=pin_memory) if cpu_offload else OffloadPolicy()
    several = world_size > 1
    if several:
        for block in blocks:
            fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward, ignored_params=ignored,
                        offload_policy=offload)
    else:
        ignored |= {p for p in module.parameters() if not p.requires_grad}
    fully_shard(module, mp_policy=policy, reshard_after_forward=several and reshard_after_forward,
                ignored_params=ignored, offload_policy=offload)
    if several:
        for p in ignored:
            if p.requires_grad:
                p.register_hook(functools.partial(_average_over_ranks, world_size=world_size))
    return blocks


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP unit (after a forward without backward, e.g. validation)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextmanager
def gathered(module: nn.Module):
    """A context in which every FSDP unit of ``module`` holds its whole parameters, also between forward calls.

    Generation runs one small forward per new token; FSDP2 would all-gather each block before it and free it after
    (a collective per block and token, which also makes every rank's token count matter). Here each unit is
    gathered once and kept; on exit the units shard again as :func:`parallelize` set them up.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    several = dist.is_initialized() and dist.get_world_size() > 1
    if isinstance(module, FSDPModule):
        # Generation calls the blocks, not the root: FSDP2 must have set the root up first (a root forward would),
        # else the first block called claims to be a root. There is no public call for it; this one is idempotent.
        module._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield module
    finally:
        for unit in units:
            unit.set_reshard_after_forward(several, recurse=False)
            unit.reshard()


def _average_over_ranks(grad: torch.Tensor, world_size: int) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad)  # SUM: gloo has no AVG
    return grad / world_size


def move_to_device(module: nn.Module, device: torch.device | str, keep_on_cpu: Callable[[torch.Tensor], bool]) -> None:
    """``module.to(device)``, except for the parameters ``keep_on_cpu`` picks (CPU offload: FSDP2's shards).

    The same per-tensor move as ``module.to`` (``nn.Module._apply``), so quantized parameters move as they would.
    """
    module._apply(lambda t: t if keep_on_cpu(t) else t.to(device))


def to_empty_keeping_buffers(module: nn.Module, device) -> None:
    """``module.to_empty(device)`` for a module whose parameters are on the meta device and whose buffers are real
    (rotary frequencies, built on every rank): ``to_empty`` would leave the buffers uninitialised too."""
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    module.to_empty(device=device)
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])


def materialize_from_rank0(module: nn.Module, full_state: dict[str, torch.Tensor], device: torch.device,
                           is_main: bool, cpu_offload: bool = False) -> None:
    """Give a module sharded on the meta device its weights: rank 0 holds them all, the others hold none.

    Each rank allocates only its own shards on ``device`` (on the CPU with ``cpu_offload``: FSDP2 wants offloaded
    shards there; parameters FSDP leaves alone and buffers still go to ``device``); rank 0 broadcasts ``full_state``
    (the module's full state dict, on its CPU) tensor by tensor, and every rank keeps its slice. So N ranks hold one
    full copy of the checkpoint in host memory between them, not N. Buffers, built for real on every rank, keep
    their values.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    to_empty_keeping_buffers(module, "cpu" if cpu_offload else device)
    if cpu_offload:  # only FSDP's shards (DTensors) stay on the CPU
        move_to_device(module, device, keep_on_cpu=lambda p: isinstance(p, DTensor))
    set_model_state_dict(module, full_state if is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
