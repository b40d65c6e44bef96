"""Strict, streamed loading of InternVL2 weights (original or native layout) into the native transformers model.

The model is built with its parameters on the meta device; checkpoint tensors are then read one at a time
(safetensors shards through their index, or legacy ``.bin`` files through ``torch.load(weights_only=True)``),
converted to native keys, cast and moved to the target device. Peak memory is one model plus one tensor, so a 76B
checkpoint never needs twice its size in RAM. Loading is strict: every checkpoint tensor must land on a parameter of
the same shape and every parameter must be filled, otherwise one CheckpointError lists all offenders.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from internvl_tune.errors import CheckpointError
from internvl_tune.models.internvl_chat.config import read_json
from internvl_tune.models.internvl_chat.key_map import LayoutSpec, convert_original_tensor, normalize_native_key

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_MAX_LISTED = 20


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in shard order (safetensors preferred over .bin)."""
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: field 'weight_map' is missing or empty — re-download the index file")
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(
                    f"{index} names shard(s) that are not in {path}: {', '.join(missing)} — finish the download"
                )
            return files
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(
        f"{path}: no weights found (model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
    )


def _check_safetensors_complete(file: Path) -> None:
    """Raise a clear error for a truncated or corrupt safetensors file (a partial download, a full disk)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: file is truncated ({size} bytes) — re-download it")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise CheckpointError(f"{file}: file is truncated (header needs {header_len} bytes) — re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file}: corrupt safetensors header — re-download it") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{file}: file is truncated: {size} bytes on disk, {8 + header_len + end} expected — re-download it"
        )


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield ``(key, tensor, file)`` for every tensor of the checkpoint, one at a time, on the CPU."""
    from safetensors import SafetensorError, safe_open

    for file in weight_files(path):
        if file.suffix == ".safetensors":
            _check_safetensors_complete(file)
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key), file
            except SafetensorError as exc:
                raise CheckpointError(f"{file}: cannot read safetensors file ({exc}) — re-download it") from exc
        else:
            try:
                state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for truncated or non-weights pickles
                raise CheckpointError(
                    f"{file}: cannot read legacy .bin weights ({type(exc).__name__}: {exc}) — re-download it, or "
                    "convert it to safetensors"
                ) from exc
            for key, tensor in state.items():
                yield key, tensor, file
            del state


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
        dtype: parameter dtype after loading (checkpoint tensors are cast).
        device: where the parameters go.
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
