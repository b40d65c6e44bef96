"""MXFP4 expert weights (GPT-OSS's release format) dequantized to a float dtype on load.

OCP microscaling FP4: a weight row is cut into blocks of 32 values; each value is a 4-bit e2m1 float (sign, 2
exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) and each block shares one e8m0 scale
(a power of two, stored as its exponent + 127). A parameter ``P`` [E, in, out] is stored as

- ``P_blocks`` uint8 [E, out, in / 32, 16]: two values per byte, the low nibble first;
- ``P_scales`` uint8 [E, out, in / 32].

Dequantizing gives [E, out, in], transposed to the parameter's [E, in, out]. The values are exact in bf16 (a 4-bit
value times a power of two), so nothing is lost by training from the dequantized weights.
"""

from __future__ import annotations

import torch

from internvl_tune.errors import CheckpointError

# e2m1 values of the 16 nibbles (bit 3 the sign)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
SUFFIXES = ("_blocks", "_scales")


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
               where: str = "") -> torch.Tensor:
    """``[E, out, in/32, 16]`` uint8 blocks and ``[E, out, in/32]`` uint8 scales -> the parameter ``[E, in, out]``."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape \
            or blocks.shape[-1] != BLOCK // 2:
        raise CheckpointError(f"{where}: MXFP4 tensors of shapes {tuple(blocks.shape)} ({blocks.dtype}) and "
                              f"{tuple(scales.shape)} ({scales.dtype}) do not pair up (expected uint8 [..., G, 16] "
                              "blocks and uint8 [..., G] scales) — the checkpoint is damaged")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [..., G, 16, 2]
    values = values.flatten(-2) * torch.exp2(scales.to(torch.float32) - 127).unsqueeze(-1)  # [..., G, 32]
    return values.flatten(-2).transpose(1, 2).to(dtype).contiguous()


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MXFP4 ``(blocks, scales)`` of a parameter ``[E, in, out]`` (each block's scale is the power of two that
    brings its largest magnitude to at most 6, values rounded to the nearest e2m1). For writing tiny test
    checkpoints in the release's format; ``dequantize`` of the result is exact where the weight already was."""
    rows = weight.transpose(1, 2).float()  # [E, out, in]
    blocks = rows.reshape(*rows.shape[:-1], -1, BLOCK)
    peak = blocks.abs().amax(-1).clamp_min(2.0 ** -126)
    exponent = torch.ceil(torch.log2(peak / 6.0)).clamp(-127, 127)
    scaled = blocks / torch.exp2(exponent).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    nibbles = (scaled.unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)  # [E, out, G, 32]
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return packed, (exponent + 127).to(torch.uint8)
