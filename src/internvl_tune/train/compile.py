"""``torch.compile`` of the repeated blocks (regional compilation, as torchtitan does it).

Each ViT and LLM block is compiled with ``dynamic=True``: packed rows and tile counts change every step, and a
symbolic length keeps one graph for all of them instead of one recompilation per shape. Identical blocks share the
graph. Inductor fuses what eager mode runs as separate kernels (RMSNorm, RoPE, SwiGLU, residual adds, dtype casts),
and fewer launches leave the host free to run ahead of the GPU. Apply before FSDP wrapping.
"""

from __future__ import annotations

import torch
from torch import nn

from internvl_tune.dist.fsdp import decoder_blocks


def compile_enabled(setting: str, device: torch.device, random_recompute: bool = False) -> bool:
    """``--torch_compile``: "True", "False", or "auto": on for CUDA devices, unless ``random_recompute``.

    ``random_recompute``: activation checkpointing re-runs blocks that draw random numbers (LoRA dropout, ViT
    drop-path). With the checkpoint outside the compiled block, PyTorch then fails on the GPU ("A different number
    of tensors was saved during the original forward and recomputation", seen on InternVL2-8B with LoRA), so
    "auto" leaves such runs eager.
    """
    if setting == "auto":
        return device.type == "cuda" and not random_recompute
    return setting == "True"


def compile_blocks(model: nn.Module) -> int:
    """Compile every repeated block of ``model`` in place; returns how many."""
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
