"""Strict, streamed loading of InternVL2 weights (original or native layout) into the native transformers model.

The model is built with its parameters on the meta device; checkpoint tensors are then read one at a time
(safetensors shards through their index, or legacy ``.bin`` files through ``torch.load(weights_only=True)``),
converted to native keys, cast and moved to the target device (or quantized there, for layers that
``models.common.quantize.to_4bit_linears`` made 4-bit). Per-expert tensors of mixture-of-experts checkpoints fill
their slot of the grouped expert parameter; MXFP4 experts are dequantized as they arrive. Peak memory is one model plus one tensor, so a 76B
checkpoint never needs twice its size in RAM. Loading is strict: every checkpoint tensor must land on a parameter of
the same shape and every parameter must be filled, otherwise one CheckpointError lists all offenders.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from internvl_tune.errors import CheckpointError
from internvl_tune.models.common import mxfp4
from internvl_tune.models.common.quantize import is_4bit, quantize_as
from internvl_tune.models.common.weights import iter_file_tensors, weight_files
from internvl_tune.models.internvl_chat import families
from internvl_tune.models.internvl_chat.key_map import (
    LayoutSpec,
    convert_original_tensor,
    expert_slot,
    normalize_native_key,
)

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


def _mxfp4_base(key: str, spec: LayoutSpec) -> tuple[str, str] | None:
    """``(key without the suffix, suffix)`` for the ``_blocks`` / ``_scales`` half of an MXFP4 expert parameter."""
    moe = families.get(spec.family).moe
    for suffix in mxfp4.SUFFIXES:
        base = key.removesuffix(suffix)
        if base != key and moe and any(base.endswith(f"{moe.experts}.{p}") for p in moe.mxfp4_params):
            return base, suffix
    return None


def _native_pairs(key: str, tensor: torch.Tensor, layout: str, spec: LayoutSpec) -> list[tuple] | None:
    """``(native parameter, tensor, expert slot or None)`` for one tensor of the files; None when the key is unknown."""
    if layout == "original":
        pairs = convert_original_tensor(key, tensor, spec)
    else:
        pairs = [(normalize_native_key(key), tensor)]
    if pairs is None:
        return None
    return [(slot.param, value, slot) if (slot := expert_slot(name, spec)) else (name, value, None)
            for name, value in pairs]


def load_weights(
    model: nn.Module,
    path: Path,
    layout: str,
    spec: LayoutSpec,
    dtype: torch.dtype | None,
    device: torch.device | str,
    tensors: Iterable[tuple[str, torch.Tensor, Path]] | None = None,
) -> int:
    """Fill every meta parameter of ``model`` from the checkpoint in ``path``, strictly.

    Per-expert tensors (``key_map.ExpertSlot``) fill their slot of the grouped parameter, which counts as filled once
    every slot is; MXFP4 expert tensors (``<param>_blocks`` + ``<param>_scales``) are dequantized to ``dtype`` (bf16
    when None) as soon as both halves have been read. Parameters that are not on the meta device are filled already
    (a new projector, ``assemble.py``): a tensor for one of them is unexpected.

    Args:
        model: built by ``build_empty_model``.
        path: checkpoint directory (named in errors).
        layout: ``original`` or ``native`` (which key names the files use).
        spec: the checkpoint's shape facts and family.
        dtype: parameter dtype after loading (checkpoint tensors are cast; 4-bit layers quantize the cast tensor).
        device: where the parameters go (and where 4-bit weights are quantized).
        tensors: ``(key, tensor, file)`` to read instead of ``path``'s files (a model assembled from several
            checkpoints).

    Returns:
        How many MXFP4 parameters were dequantized (for the run's plan line).
    """
    expected = {name: p for name, p in model.named_parameters() if p.is_meta}
    filled: set[str] = set()
    slots: dict[str, set[tuple[int, int]]] = {}  # grouped parameter -> (expert, part) slots filled so far
    halves: dict[str, dict[str, tuple[torch.Tensor, Path]]] = {}  # MXFP4 parameter -> the halves read so far
    dequantized = 0
    unexpected, misshaped, bad_dtype, duplicated = [], [], [], []
    for key, tensor, file in iter_tensors(path) if tensors is None else tensors:
        if found := _mxfp4_base(key, spec):
            base, suffix = found
            halves.setdefault(base, {})[suffix] = (tensor, file)
            if len(halves[base]) < 2:
                continue
            pair = halves.pop(base)
            key = base
            tensor = mxfp4.dequantize(pair["_blocks"][0], pair["_scales"][0], dtype or torch.bfloat16,
                                      f"{key} [{file.name}]")
            dequantized += 1
        pairs = _native_pairs(key, tensor, layout, spec)
        if pairs is None or any(name not in expected for name, _, _ in pairs):
            unexpected.append(f"{key} [{file.name}]")
            continue
        if not tensor.is_floating_point():
            bad_dtype.append(f"{key}: {tensor.dtype} [{file.name}]")
            continue
        for name, value, slot in pairs:
            param = expected[name]
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            if slot is not None:
                index = slot.index(param.shape)
                if slot.expert >= param.shape[0] or tuple(value.shape) != tuple(param[index].shape):
                    misshaped.append(f"{key}: {tuple(value.shape)} in file, expert {slot.expert} of "
                                     f"{tuple(param.shape)} expected [{file.name}]")
                    continue
                if (slot.expert, slot.part) in slots.get(name, ()):
                    duplicated.append(f"{key} [{file.name}]")
                    continue
                if name not in slots:  # the grouped parameter is allocated by its first slot
                    data = torch.empty(param.shape, dtype=dtype or value.dtype, device=device)
                    module._parameters[leaf] = nn.Parameter(data, requires_grad=param.requires_grad)
                    slots[name] = set()
                with torch.no_grad():
                    module._parameters[leaf][index].copy_(value)
                slots[name].add((slot.expert, slot.part))
                if len(slots[name]) == param.shape[0] * slot.parts:
                    filled.add(name)
                continue
            if tuple(value.shape) != tuple(param.shape):
                misshaped.append(f"{key}: {tuple(value.shape)} in file, {tuple(param.shape)} expected [{file.name}]")
                continue
            if name in filled or name in slots:
                duplicated.append(f"{key} [{file.name}]")
                continue
            if is_4bit(param):  # quantized as it is read: the unquantized weights are never all in memory
                module._parameters[leaf] = quantize_as(param, value.to(dtype=dtype), device)
            else:
                data = value.to(device=device, dtype=dtype, copy=True).contiguous()
                module._parameters[leaf] = nn.Parameter(data, requires_grad=param.requires_grad)
            filled.add(name)
    unexpected += [f"{base}{suffix} without its {other} [{file.name}]" for base, got in halves.items()
                   for suffix, (_, file) in got.items() for other in set(mxfp4.SUFFIXES) - {suffix}]
    missing = sorted(set(expected) - filled)
    missing = [f"{name} (experts {sorted({e for e, _ in slots[name]})} of {expected[name].shape[0]} found)"
               if name in slots else name for name in missing]
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
    return dequantized
