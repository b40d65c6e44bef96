"""Atomic, verified, reshardable training checkpoints in safetensors (no pickle), one file per rank.

The files (``trainer_state.json``, ``rankNNNNN-of-MMMMM.safetensors``, ``manifest.json``) and how they are read are
described in ``models/common/checkpoint_files.py``; this module writes them and restores a run from them.

Tensors are named after the optimizer's parameter names (``param.<name>``, ``optim.<name>.<moment>``), the names of
the checkpoint without wrapper prefixes, so what a checkpoint holds never depends on module identities, wrappers
or whether FSDP currently has a parameter gathered. Frozen parameters are not stored: they come back from the base
checkpoint (``trainer_state.json`` names it). Each rank writes its own local shard (``DTensor.to_local()``) with the
rows it covers, so saving is parallel and needs no gather.

**Writing.** Into ``checkpoint-<step>.partial``; each rank fsyncs and hashes its file, rank 0 writes the state and
then the manifest, and the folder is renamed only after that, so a crash or a full disk never leaves a half-written
checkpoint that looks complete. A rank that cannot write (disk full, quota, read-only) is known to all ranks at the
next step of the save, so none waits forever; the partial folder is removed, the previous checkpoint stays, and the
error is one line (``internvl_tune.storage``).

**Resuming.** ``auto`` takes the newest checkpoint whose files match their manifest (the ranks share the hashing)
and warns about each damaged one it skips; an explicit path that is damaged is an error. The trainable state is
resharded on load: each rank reads the rows of every parameter and AdamW moment that its current FSDP2 shard
covers, from whichever rank files hold them, so a run written by N processes resumes on M. What depends on the
number of processes:

- the data position: the step count, valid for any world size *with the same global batch* (the order of an epoch
  depends on it); another global batch is refused with the combinations that give the old one (converting the
  position into samples would not give the same next samples: the epoch's order changes with the global batch);
- RNG states (dropout, drop path): rank r continues rank r's stream; ranks the old run did not have start from
  ``seed * 1_000_003 + step * 1_009 + r``; states of ranks beyond the new world size are dropped.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch

from internvl_tune.dist import DistInfo, all_gather_object_ordered
from internvl_tune.errors import CheckpointError, StorageError, UserError
from internvl_tune.models.common.checkpoint_files import (
    MANIFEST,
    ROWS_KEY,
    STATE_FILE,
    RankFiles,
    digest,
    listed_files,
    problems,
    rank_file,
    read_state,
)
from internvl_tune.storage import fsync_dir, save_safetensors, storage_error

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _rows(t: torch.Tensor) -> tuple[int, int] | None:
    """``(first row, global rows)`` of this rank's slice of a tensor FSDP2 shards along dim 0; None when whole.

    FSDP2 cuts dim 0 as ``torch.chunk`` does: ``ceil(n / world)`` rows per rank, in rank order, the last ones
    shorter or empty.
    """
    if not hasattr(t, "placements"):
        return None
    from torch.distributed.tensor import Replicate, Shard

    if all(isinstance(p, Replicate) for p in t.placements):
        return None
    if len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise NotImplementedError(f"checkpoints hold dim-0 shards on a 1-D mesh, not {t.placements}")
    total, world, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-total // world)
    first = min(rank * chunk, total)
    if _local(t).shape[0] != max(0, min(total, first + chunk) - first):
        raise NotImplementedError(f"unexpected FSDP2 shard: {tuple(_local(t).shape)} of {tuple(t.shape)} on rank {rank}")
    return first, total


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete (renamed into place) checkpoints in ``output_dir``, oldest first; intact or not."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        m = _CKPT_RE.match(child.name)
        if m and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


class Checkpointer:
    """Saves and restores the trainable state of a run (see the module docstring)."""

    def __init__(self, output_dir: Path, info: DistInfo, keep: int | None = None):
        self.output_dir = Path(output_dir)
        self.info = info
        self.keep = keep

    # ------------------------------------------------------------------ saving
    def save(self, step: int, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        """Write ``checkpoint-<step>`` atomically; every rank must call this. Returns the final path."""
        info = self.info
        final = self.output_dir / f"checkpoint-{step}"
        partial = self.output_dir / f"checkpoint-{step}.partial"
        tensors, rows = _trainable_state(optimizer)
        tensors["rng.cpu"] = torch.get_rng_state()
        if info.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(info.device).cpu()
        needed = sum(t.numel() * t.element_size() for t in tensors.values())
        previous = [p.name for p in list_checkpoints(self.output_dir) if p != final]
        fix = ("free space there (--save_total_limit N keeps fewer checkpoints) or move --output_dir to a larger disk; "
               + (f"{previous[-1]} is intact: resume from it with --resume_from_checkpoint auto" if previous
                  else "no earlier checkpoint exists"))
        what = f"{final.name}" + (f" (rank {info.rank}'s part)" if info.world_size > 1 else "")

        def prepare():
            if info.is_main:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)

        def write_own_file():
            file = partial / rank_file(info.rank, info.world_size)
            metadata = {"step": str(step), ROWS_KEY: json.dumps(rows)}
            save_safetensors(tensors, file, metadata=metadata, fsync=True)
            return file.name, digest(file)

        self._together(prepare, what, needed, fix, partial)
        entries = all_gather_object_ordered([self._together(write_own_file, what, needed, fix, partial)])

        def finish():
            if not info.is_main:
                return
            record = {**state, "step": step, "world_size": info.world_size}
            (partial / STATE_FILE).write_text(json.dumps(record, indent=2))
            files = dict(entries)
            files[STATE_FILE] = digest(partial / STATE_FILE)
            (partial / MANIFEST).write_text(json.dumps({"hash": "sha256", "files": files}, indent=2) + "\n")
            fsync_dir(partial)
            if final.exists():  # re-saving a step after a resume: replace the old copy last
                stale = final.with_name(final.name + ".old")
                final.rename(stale)
                partial.rename(final)
                shutil.rmtree(stale)
            else:
                partial.rename(final)
            fsync_dir(self.output_dir)
            self._prune()

        self._together(finish, final.name, needed, fix, partial)
        return final

    def _together(self, fn, what: str, needed: int, fix: str, partial: Path):
        """Run ``fn`` on every rank and agree on the outcome (this is also the barrier between save phases).

        If any rank failed, rank 0 removes ``partial`` and every rank raises: the failing one its own error (one
        line for a full or read-only disk), the others one naming the failing rank.
        """
        failure, result = None, None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 (re-raised below, after the other ranks know)
            failure = storage_error(exc, what, partial, needed, fix) or exc
        outcomes = all_gather_object_ordered([None if failure is None else
                                              (isinstance(failure, StorageError), str(failure))])
        failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
        if not failed:
            return result
        if self.info.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        if failure is not None:
            raise failure
        rank, (is_storage, text) = failed[0]
        raise (StorageError if is_storage else RuntimeError)(f"rank {rank}: {text}")

    def newest(self) -> Path | None:
        """The newest checkpoint in the output directory (intact or not), or None."""
        found = list_checkpoints(self.output_dir)
        return found[-1] if found else None

    def _prune(self) -> None:
        if not self.keep:
            return
        for old in list_checkpoints(self.output_dir)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ choosing and verifying
    def problems(self, path: Path) -> list[str]:
        """What is damaged in the checkpoint ``path`` ([] when intact); the ranks share the hashing."""
        try:
            names = listed_files(path)
        except CheckpointError as exc:
            return [str(exc)]
        mine = problems(path, names[self.info.rank :: self.info.world_size])
        return all_gather_object_ordered(mine)

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: an explicit path (which must be intact), the newest intact one for
        ``"auto"`` (each damaged newer one named in a warning), or None."""
        if not resume:
            return None
        if resume == "auto":
            found = list_checkpoints(self.output_dir)
            for path in reversed(found):
                damaged = self.problems(path)
                if not damaged:
                    return path
                if self.info.is_main:
                    print(f"warning: {path.name} is damaged ({damaged[0]}); trying an earlier checkpoint",
                          file=sys.stderr, flush=True)
            if found:
                raise CheckpointError(f"every checkpoint in {self.output_dir} is damaged ({', '.join(p.name for p in found)}"
                                      ") — start over with --overwrite_output_dir True")
            return None
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise UserError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {STATE_FILE})")
        damaged = self.problems(path)
        if damaged:
            raise CheckpointError(f"--resume_from_checkpoint {path}: the checkpoint is damaged: "
                                  f"{'; '.join(damaged[:5])} — resume from an earlier one (--resume_from_checkpoint "
                                  "auto picks the newest intact one)")
        return path

    # ------------------------------------------------------------------ loading
    def load(self, path: Path, optimizer: torch.optim.Optimizer) -> dict:
        """Restore trainable parameters, optimizer moments and RNG states, resharded onto this run's ranks (see the
        module docstring); returns the saved trainer state."""
        info = self.info
        state = read_state(path)
        if state["world_size"] != info.world_size and "global_batch" not in state:
            raise UserError(f"{path} was written by {state['world_size']} processes, before checkpoints recorded "
                            f"their global batch; resume it with {state['world_size']} processes")
        files = RankFiles(Path(path), state["world_size"])
        _restore_trainable_state(optimizer, files, path)
        if info.rank < state["world_size"]:
            torch.set_rng_state(files.read("rng.cpu", rank=info.rank))
            if files.has("rng.cuda", info.rank) and info.device.type == "cuda":
                torch.cuda.set_rng_state(files.read("rng.cuda", rank=info.rank), info.device)
        else:  # a rank the old run did not have
            seed = state.get("config", {}).get("train", {}).get("seed", 0)
            torch.manual_seed(seed * 1_000_003 + state["step"] * 1_009 + info.rank)
        return state


def _named_params(optimizer: torch.optim.Optimizer):
    """``(name, parameter, group)`` of every parameter the optimizer updates (``build_param_groups`` names them)."""
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            yield name, p, group


def _trainable_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """This rank's tensors and, for each sharded one, ``[first row, global rows]``."""
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, list[int]] = {}
    for name, p, _ in _named_params(optimizer):
        items = [(f"param.{name}", p.detach())]
        items += [(f"optim.{name}.{key}", value) for key, value in optimizer.state.get(p, {}).items()]
        for key, value in items:
            out[key] = _local(value).detach().contiguous().cpu()
            where = _rows(value) if value.shape == p.shape else None
            if where is not None:
                rows[key] = list(where)
    return out, rows


def _restore_trainable_state(optimizer: torch.optim.Optimizer, files: RankFiles, path) -> None:
    expected = {f"param.{name}": p for name, p, _ in _named_params(optimizer)}
    stored = {k for k in files.keys() if k.startswith("param.")}
    if set(expected) != stored:
        missing, extra = sorted(set(expected) - stored), sorted(stored - set(expected))
        raise UserError(
            f"{path} does not match this run's trainable parameters (missing {missing[:5]}, unexpected {extra[:5]}); "
            f"resume with the same freeze / LoRA flags"
        )
    wrong = [f"{k[len('param.'):]}: {files.shape(k)} stored, {tuple(p.shape)} now"
             for k, p in expected.items() if files.shape(k) != tuple(p.shape)]
    if wrong:
        raise UserError(f"{path} holds trainable parameters of other shapes ({'; '.join(wrong[:3])}): it was written "
                        f"with other LoRA ranks or model settings; resume with the flags of that run (its "
                        f"{STATE_FILE} lists them under 'config'), or start a new --output_dir")
    moments: dict[str, list[str]] = {}
    for key in files.keys():
        if key.startswith("optim."):
            moments.setdefault(key[len("optim."):].rpartition(".")[0], []).append(key)
    with torch.no_grad():
        for name, p, group in _named_params(optimizer):
            local, where = _local(p), _rows(p)
            span = () if where is None else (where[0], where[0] + local.shape[0])
            local.copy_(files.read(f"param.{name}", *span).to(local.device, local.dtype))
            st = {}
            for key in moments.get(name, []):
                field = key[len(f"optim.{name}."):]
                if field == "step":
                    st[field] = files.read(key).to(local.device if group.get("fused") else "cpu")
                else:
                    holder = torch.zeros_like(p)
                    _local(holder).copy_(files.read(key, *span).to(_local(holder).device))
                    st[field] = holder
            if st:
                optimizer.state[p] = st
