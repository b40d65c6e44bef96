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


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``--torch_compile``: "True", "False", or "auto" (on for CUDA devices)."""
    return setting == "True" or (setting == "auto" and device.type == "cuda")


def compile_blocks(model: nn.Module) -> int:
    """Compile every repeated block of ``model`` in place; returns how many."""
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
