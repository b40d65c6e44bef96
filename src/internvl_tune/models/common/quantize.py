"""4-bit base weights for QLoRA: bitsandbytes NF4 with double quantization (as transformers' ``load_in_4bit``).

A linear layer chosen for 4 bits becomes a ``bitsandbytes.nn.Linear4bit`` on the meta device before loading
(:func:`to_4bit_linears`); the loader then turns each of its checkpoint tensors into packed 4-bit data on the target
device as it is read (:func:`quantize_as`), so the unquantized weights are never held all at once. Weights are split
into blocks of 64 with one scale each; the scales are themselves quantized to 8 bits in blocks of 256 (double
quantization): about 0.52 bytes per weight in all (:func:`stored_bytes`). Compute runs in the layer's compute dtype.

bitsandbytes is optional (``pip install bitsandbytes``); nothing here imports it before 4-bit weights are asked for.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from internvl_tune.errors import UserError

QUANT_TYPE = "nf4"
BLOCKSIZE = 64  # weights per scale
NESTED_BLOCKSIZE = 256  # scales per second-level scale (bitsandbytes' double quantization)
CODE_BYTES = 16 * 4  # the NF4 code book (fp32)
NESTED_STATE_BYTES = 256 * 4 + 4  # the 8-bit code book of the scales and their offset (fp32)
INSTALL = "pip install bitsandbytes (or pip install 'internvl-tune[qlora]')"


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or a UserError that names the package and how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise UserError(f"--load_in_4bit needs the bitsandbytes package, which cannot be imported here ({exc}): "
                        f"{INSTALL}") from None
    return bitsandbytes


def check_4bit_device(device: torch.device | str) -> None:
    """Quantize a small layer on ``device`` and run it forward and backward; a UserError when bitsandbytes cannot
    (before 0.46 it had no 4-bit CPU kernels: a CPU layer silently stayed unquantized)."""
    bnb = require_bitsandbytes()
    device = torch.device(device)
    try:
        layer = bnb.nn.Linear4bit(BLOCKSIZE, BLOCKSIZE, bias=False, compute_dtype=torch.float32,
                                  compress_statistics=True, quant_type=QUANT_TYPE).to(device)
        if getattr(layer.weight, "quant_state", None) is None:
            raise RuntimeError("the weights stayed unquantized")
        x = torch.ones(1, BLOCKSIZE, device=device, requires_grad=True)
        layer(x).sum().backward()
    except Exception as exc:  # bitsandbytes raises many types for a device it has no kernels for
        version = getattr(bnb, "__version__", "?")
        fix = "train on a CUDA GPU" if device.type == "cuda" else \
            "train on a CUDA GPU, or upgrade bitsandbytes (4-bit on the CPU needs 0.46 or later: pip install -U bitsandbytes)"
        raise UserError(f"--load_in_4bit: bitsandbytes {version} cannot run 4-bit layers on {device.type} "
                        f"({type(exc).__name__}: {exc}) — {fix}") from None


def to_4bit_linears(module: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Replace every ``nn.Linear`` below ``module`` by an empty NF4 ``Linear4bit`` on the meta device, in place.

    Returns:
        The names (relative to ``module``) of the replaced layers.
    """
    bnb = require_bitsandbytes()
    names = [name for name, m in module.named_modules() if type(m) is nn.Linear]
    for name in names:
        old = module.get_submodule(name)
        parent, _, child = name.rpartition(".")
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=compute_dtype, compress_statistics=True, quant_type=QUANT_TYPE,
                                quant_storage=torch.uint8, device="meta")
        # bitsandbytes repacks CPU weights for inference at the first no-grad forward in eval mode (a validation
        # pass); training after it loses the input gradients (bitsandbytes 0.50, CPUs with AVX512-BF16)
        new.support_avx512bf16_for_cpu = False
        setattr(module.get_submodule(parent), child, new)
    return names


def is_4bit(param: torch.Tensor) -> bool:
    """True for a bitsandbytes 4-bit parameter (quantized, or still empty on the meta device)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(param, bnb.nn.Params4bit)


def set_trainable(module: nn.Module, trainable: bool) -> None:
    """Set ``requires_grad`` of every parameter of ``module``; 4-bit weights (packed in uint8) never train."""
    for p in module.parameters():
        if p.is_floating_point():
            p.requires_grad_(trainable)


def quantize_as(empty: torch.Tensor, value: torch.Tensor, device: torch.device | str) -> nn.Parameter:
    """The 4-bit parameter holding ``value``, quantized on ``device`` with the settings of the meta parameter
    ``empty`` (the layer it belongs to learns its quantization state)."""
    bnb = sys.modules["bitsandbytes"]
    param = bnb.nn.Params4bit(value, requires_grad=False, blocksize=empty.blocksize,
                              compress_statistics=empty.compress_statistics, quant_type=empty.quant_type,
                              quant_storage=empty.quant_storage, module=empty.module)
    return param.to(device)


def num_weights(param: torch.Tensor) -> int:
    """The weights a parameter stands for: a quantized 4-bit one packs two in each byte."""
    if is_4bit(param) and param.bnb_quantized:
        return param.quant_state.shape.numel()
    return param.numel()


def stored_bytes(param: torch.Tensor) -> int:
    """Bytes a parameter occupies: 4-bit ones with their quantization constants (computed from the shape, so a
    parameter still on the meta device counts as it will once loaded); others as stored."""
    if not is_4bit(param):
        return param.numel() * param.element_size()
    n = num_weights(param)
    blocks = -(-n // param.blocksize)
    if param.compress_statistics:  # 8-bit scales, fp32 second-level scales
        scales = blocks + -(-blocks // NESTED_BLOCKSIZE) * 4 + NESTED_STATE_BYTES
    else:
        scales = blocks * 4
    return -(-n // 2) + scales + CODE_BYTES
