"""The files of a training checkpoint (``checkpoint-<step>/``): names, the manifest, and reading tensors by rows.

The writer is ``train/checkpoint.py``; reading lives here, in the library, so that a checkpoint can be opened as a
model (``models/internvl_chat/training_checkpoint.py``) without the training application. Layout::

    trainer_state.json                  step, world size, global batch, counters, the run's resolved config
    rank00000-of-00002.safetensors      one rank's slices of the trainable parameters, AdamW moments, RNG states
    rank00001-of-00002.safetensors
    manifest.json                       written last: every other file's size and SHA-256

**Manifest.** A checkpoint is renamed into place only when complete, but a file can still be damaged afterwards
(a copy cut short, a disk error, a sync tool that truncated it). Before a checkpoint is used, every file is checked
against the manifest. SHA-256 because it is in the standard library, hardware-accelerated on x86 and ARM (1.7 GB/s on
one core of the development machine: a file is hashed in about the time it takes to read it from disk again) and
checkable by hand (``sha256sum``); a faster non-cryptographic hash (xxhash) would be another dependency for a cost
that is small next to writing the checkpoint. Checkpoints written before manifests existed are verified by reading:
``trainer_state.json`` must parse and every rank file must be a complete safetensors file.

**Rows.** FSDP2 shards a parameter in rank order along its first dimension (``torch.chunk`` sizes). Each rank file
records, in its safetensors metadata under ``"rows"``, the global first-dimension size and this rank's first row for
every sharded tensor; tensors it does not list are whole (replicated, e.g. 0-d parameters and optimizer step
counts). Files written before that key existed are read with the same rule, their offsets taken from the running
sum of the ranks' sizes. :class:`RankFiles` then reads any row range of any tensor from whichever files hold it, so a
checkpoint written by N ranks can be resumed by M (``train/checkpoint.py``) and read whole by one process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from internvl_tune.errors import CheckpointError
from internvl_tune.models.common.weights import check_safetensors_complete

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
ROWS_KEY = "rows"
HASH = "sha256"
_CHUNK = 8 * 2**20


def rank_file(rank: int, world_size: int) -> str:
    """The file name of one rank's part of a checkpoint."""
    return f"rank{rank:05d}-of-{world_size:05d}.safetensors"


def digest(path: Path) -> dict:
    """``{"bytes": size, "sha256": hex}`` of a file, read in 8 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while piece := fh.read(_CHUNK):
            h.update(piece)
    return {"bytes": path.stat().st_size, HASH: h.hexdigest()}


def read_state(path: Path) -> dict:
    """``trainer_state.json`` of the checkpoint ``path``."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: damaged ({exc}) — this checkpoint cannot be used; take an earlier one") from None
    if not isinstance(state, dict) or not isinstance(state.get("world_size"), int) or "step" not in state:
        raise CheckpointError(f"{file}: damaged (no step or world_size) — this checkpoint cannot be used")
    return state


def read_manifest(path: Path) -> dict | None:
    """The ``files`` table of the checkpoint's manifest, or None for a checkpoint written before manifests."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        files = json.loads(file.read_text(encoding="utf-8")).get("files")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        files = None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and {"bytes", HASH} <= set(v) for v in files.values()):
        raise CheckpointError(f"{file}: damaged — this checkpoint cannot be verified; take an earlier one")
    return files


def problems(path: Path, names: list[str] | None = None, hashes: bool = True) -> list[str]:
    """What is wrong with the files ``names`` of the checkpoint ``path`` (all of them by default); [] when intact.

    With a manifest each file must have its recorded size and (``hashes``) SHA-256; without one, the state must parse
    and each rank file must be complete.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
        if manifest is None:
            state = read_state(path)
            expected = {STATE_FILE: None, **{rank_file(r, state["world_size"]): None
                                              for r in range(state["world_size"])}}
        else:
            expected = manifest
    except CheckpointError as exc:
        return [str(exc)]
    found = []
    for name in expected if names is None else names:
        file = path / name
        if name not in expected:
            found.append(f"{file}: not listed in {MANIFEST}")
        elif not file.is_file():
            found.append(f"{file} is missing")
        elif manifest is not None and file.stat().st_size != manifest[name]["bytes"]:
            found.append(f"{file}: {file.stat().st_size} bytes, {manifest[name]['bytes']} when written")
        elif manifest is not None and hashes and digest(file)[HASH] != manifest[name][HASH]:
            found.append(f"{file}: its content changed since it was written (SHA-256 differs)")
        elif manifest is None and file.suffix == ".safetensors":
            try:
                check_safetensors_complete(file)
            except CheckpointError as exc:
                found.append(str(exc))
        elif manifest is None:
            try:
                read_state(path)
            except CheckpointError as exc:
                found.append(str(exc))
    return found


def listed_files(path: Path) -> list[str]:
    """The files the checkpoint's manifest lists (or, before manifests, the state and rank files), sorted."""
    manifest = read_manifest(path)
    if manifest is not None:
        return sorted(manifest)
    world = read_state(path)["world_size"]
    return sorted([STATE_FILE] + [rank_file(r, world) for r in range(world)])


def verify(path: Path) -> None:
    """Raise a CheckpointError naming every damaged file of the checkpoint ``path``."""
    found = problems(path)
    if found:
        raise CheckpointError(f"{path} is damaged: {'; '.join(found[:5])} — this checkpoint cannot be used; resume "
                              "from an earlier one (--resume_from_checkpoint auto picks the newest intact one)")


class RankFiles:
    """Every rank file of a checkpoint, opened lazily; reads any rows of any tensor (see the module docstring)."""

    def __init__(self, path: Path, world_size: int):
        from safetensors import safe_open

        self.path, self.world_size = Path(path), world_size
        self.files = []
        for rank in range(world_size):
            file = self.path / rank_file(rank, world_size)
            if not file.is_file():
                raise CheckpointError(f"{file} is missing: the checkpoint is incomplete")
            check_safetensors_complete(file)
            self.files.append(safe_open(str(file), framework="pt", device="cpu"))
        self._rows = self._layout()

    def _layout(self) -> dict[str, tuple[int | None, list[tuple[int, int, int]]]]:
        """``key -> (global rows, [(rank, first row, rows)])`` for sharded tensors, ``(None, [])`` for whole ones."""
        layout: dict[str, tuple[int | None, list[tuple[int, int, int]]]] = {}
        for rank, f in enumerate(self.files):
            recorded = (f.metadata() or {}).get(ROWS_KEY)
            rows = json.loads(recorded) if recorded else None
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                total, parts = layout.setdefault(key, (None, []))
                if rows is not None and key in rows:
                    parts.append((rank, rows[key][0], shape[0]))
                    layout[key] = (rows[key][1], parts)
                elif rows is None and shape:  # files without the key: dim-0 slices in rank order
                    start = parts[-1][1] + parts[-1][2] if parts else 0
                    parts.append((rank, start, shape[0]))
                    layout[key] = (start + shape[0], parts)
        return layout

    def keys(self) -> list[str]:
        return list(self._rows)

    def shape(self, key: str) -> tuple[int, ...]:
        """The global shape of ``key``."""
        total, parts = self._rows[key]
        holder = parts[0][0] if parts else next(r for r in range(len(self.files)) if self.has(key, r))
        shape = list(self.files[holder].get_slice(key).get_shape())
        if parts:
            shape[0] = total
        return tuple(shape)

    def has(self, key: str, rank: int | None = None) -> bool:
        if rank is not None:
            return rank < len(self.files) and key in self.files[rank].keys()
        return key in self._rows

    def read(self, key: str, start: int | None = None, stop: int | None = None, rank: int = 0) -> torch.Tensor:
        """Rows ``[start, stop)`` of the global tensor ``key`` (all of it by default); a whole (replicated) tensor
        comes from ``rank``'s file when it has one."""
        if key not in self._rows:
            raise CheckpointError(f"{self.path}: no tensor {key}")
        total, parts = self._rows[key]
        if not parts:
            holder = rank if self.has(key, rank) else next(r for r in range(len(self.files)) if self.has(key, r))
            full = self.files[holder].get_tensor(key)
            return full if start is None else full[start:stop]
        start, stop = (0, total) if start is None else (start, stop)
        pieces, covered = [], start
        for r, first, n in sorted(parts, key=lambda p: p[1]):
            lo, hi = max(covered, first), min(stop, first + n)
            if lo < hi and lo == covered:
                pieces.append(self.files[r].get_slice(key)[lo - first : hi - first])
                covered = hi
        if covered < stop:
            raise CheckpointError(f"{self.path}: rows {covered}-{stop} of {key} are in no rank file — the checkpoint "
                                  "is incomplete")
        if not pieces:
            return self.files[parts[0][0]].get_slice(key)[0:0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def read_trainable_params(path: str | Path, check: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """The trainer state of a checkpoint and its trainable parameters as whole tensors (``{name: tensor}``).

    Args:
        check: verify every file against the manifest first (a CheckpointError names the damaged ones).
    """
    path = Path(path)
    state = read_state(path)
    if check:
        verify(path)
    files = RankFiles(path, state["world_size"])
    return state, {key[len("param."):]: files.read(key) for key in files.keys() if key.startswith("param.")}

