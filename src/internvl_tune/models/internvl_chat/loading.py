"""Strict, streamed loading of InternVL2 weights (original or native layout) into the native transformers model.

The model is built with its parameters on the meta device; checkpoint tensors are then read one at a time
(safetensors shards through their index, or legacy ``.bin`` files through ``torch.load(weights_only=True)``),
converted to native keys, cast and moved to the target device (or quantized there, for layers that
``models.common.quantize.to_4bit_linears`` made 4-bit). Peak memory is one model plus one tensor, so a 76B
checkpoint never needs twice its size in RAM. Loading is strict: every checkpoint tensor must land on a parameter of
the same shape and every parameter must be filled, otherwise one CheckpointError lists all offenders.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from internvl_tune.errors import CheckpointError
from internvl_tune.models.common.quantize import is_4bit, quantize_as
from internvl_tune.models.common.weights import iter_file_tensors, weight_files
from internvl_tune.models.internvl_chat.key_map import LayoutSpec, convert_original_tensor, normalize_native_key

_MAX_LISTED = 20


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield ``(key, tensor, file)`` for every tensor of the checkpoint, one at a time, on the CPU."""
    for file in weight_files(path):
        for key, tensor in iter_file_tensors(file):
            yield key, tensor, file


def build_empty_model(config) -> nn.Module:
    """``InternVLForConditionalGeneration`` with parameters on the meta device (buffers stay real)."""
    from accelerate import init_empty_weights
    from transformers import InternVLForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        model = InternVLForConditionalGeneration(config)
    return model


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def load_weights(
    model: nn.Module,
    path: Path,
    layout: str,
    spec: LayoutSpec | None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> None:
    """Fill every meta parameter of ``model`` from the checkpoint in ``path``, strictly.

    Args:
        model: built by ``build_empty_model``.
        path: checkpoint directory.
        layout: ``original`` or ``native`` (which key names the files use).
        spec: shape facts for the original layout (None for native).
        dtype: parameter dtype after loading (checkpoint tensors are cast; 4-bit layers quantize the cast tensor).
        device: where the parameters go (and where 4-bit weights are quantized).
    """
    expected = dict(model.named_parameters())
    filled: set[str] = set()
    unexpected, misshaped, bad_dtype, duplicated = [], [], [], []
    for key, tensor, file in iter_tensors(path):
        if layout == "original":
            pairs = convert_original_tensor(key, tensor, spec)
        else:
            pairs = [(normalize_native_key(key), tensor)]
        if pairs is None or any(name not in expected for name, _ in pairs):
            unexpected.append(f"{key} [{file.name}]")
            continue
        if not tensor.is_floating_point():
            bad_dtype.append(f"{key}: {tensor.dtype} [{file.name}]")
            continue
        for name, value in pairs:
            param = expected[name]
            if tuple(value.shape) != tuple(param.shape):
                misshaped.append(f"{key}: {tuple(value.shape)} in file, {tuple(param.shape)} expected [{file.name}]")
                continue
            if name in filled:
                duplicated.append(f"{key} [{file.name}]")
                continue
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            if is_4bit(param):  # quantized as it is read: the unquantized weights are never all in memory
                module._parameters[leaf] = quantize_as(param, value.to(dtype=dtype), device)
            else:
                data = value.to(device=device, dtype=dtype, copy=True).contiguous()
                module._parameters[leaf] = nn.Parameter(data, requires_grad=param.requires_grad)
            filled.add(name)
    missing = sorted(set(expected) - filled)
    if unexpected or missing or misshaped or bad_dtype or duplicated:
        message = f"{path}: the checkpoint does not match the model exactly ({layout} layout)"
        for title, items in (
            ("unexpected tensors (no matching parameter)", unexpected),
            ("missing parameters (not in any file)", missing),
            ("tensors with the wrong shape", misshaped),
            ("tensors with a non-float dtype", bad_dtype),
            ("tensors given twice", duplicated),
        ):
            if items:
                message += _listing(title, items)
        message += "\n  fix: check that config.json belongs to these weights and that every shard is complete"
        raise CheckpointError(message)
    model.to(device)  # the (non-persistent) buffers, e.g. rotary frequencies, follow the parameters
