"""Checkpoint weight files: reading them safely (which files, their tensors one at a time) and writing shards.

Shared by the InternVL2 and InternVL-C/G loaders and savers. safetensors shards (through ``model.safetensors.index.json``) are
preferred; legacy ``.bin`` files are read only with ``torch.load(weights_only=True)``, never as arbitrary pickles.
A truncated or corrupt file (a partial download, a full disk) gives a CheckpointError naming it, not a crash.
Shards are written with a plain file's mode (``internvl_tune.storage.save_safetensors``: safetensors alone makes
them 0600, unreadable for a server running as another user).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from internvl_tune.errors import CheckpointError
from internvl_tune.storage import save_safetensors

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
MAX_SHARD_BYTES = 5 * 2**30


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in shard order (safetensors preferred over .bin)."""
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: not a valid weight index ({exc}) — re-download it") from None
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


def check_safetensors_complete(file: Path) -> None:
    """Raise a clear error for a truncated or corrupt safetensors file."""
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


def file_keys(file: Path) -> list[str]:
    """Tensor names of one weight file (a safetensors header read; a .bin file is loaded)."""
    if file.suffix == ".safetensors":
        return [key for key, _ in _safetensors(file, load=False)]
    return [key for key, _ in iter_file_tensors(file)]


def _safetensors(file: Path, load: bool = True):
    from safetensors import SafetensorError, safe_open

    check_safetensors_complete(file)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, (f.get_tensor(key) if load else None)
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: cannot read safetensors file ({exc}) — re-download it") from exc


def iter_file_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` of one weight file, one tensor at a time, on the CPU."""
    if file.suffix == ".safetensors":
        yield from _safetensors(file)
        return
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for truncated or non-weights pickles
        raise CheckpointError(
            f"{file}: cannot read legacy .bin weights ({type(exc).__name__}: {exc}) — re-download it, or "
            "convert it to safetensors"
        ) from exc
    yield from state.items()


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` contiguous and alone in its storage (a copy when it is a view into a larger one)."""
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def write_shards(out: Path, state: dict[str, torch.Tensor], num_shards: int | None = None,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write ``state`` as ``model.safetensors``, or as numbered shards plus ``model.safetensors.index.json``.

    Args:
        out: existing directory.
        state: tensors by key, in the order they are written (made contiguous; safetensors refuses shared storage,
            so a view of a larger tensor, such as one expert of a grouped expert tensor, is copied as its shard is
            written, and tied tensors must be cloned by the caller).
        num_shards: force this many shards; default: as many as needed to stay under ``max_shard_bytes`` each.
    """
    keys = list(state)
    sizes = [state[k].numel() * state[k].element_size() for k in keys]
    total = sum(sizes)
    count = num_shards or max(1, -(-total // max_shard_bytes))
    if count == 1:
        save_safetensors({k: _own(state[k]) for k in keys}, out / "model.safetensors", metadata={"format": "pt"})
        return
    # Greedy split in key order so each shard holds about total/count bytes.
    target, groups, current, current_size = total / count, [], [], 0
    for key, size in zip(keys, sizes):
        if current and current_size + size > target and len(groups) < count - 1:
            groups.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
    groups.append(current)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_safetensors({k: _own(state[k]) for k in group}, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
