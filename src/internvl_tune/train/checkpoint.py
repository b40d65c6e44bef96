"""Atomic, resumable training checkpoints in safetensors (no pickle), one file per rank.

Layout of ``<output_dir>/checkpoint-<step>/``::

    trainer_state.json                      step, world size, counters, the run's resolved config (rank 0)
    rank00000-of-00002.safetensors          this rank's shards of the trainable parameters, their AdamW
    rank00001-of-00002.safetensors          moments and step, and its RNG states

Tensors are named after the optimizer's parameter names (``param.<name>``, ``optim.<name>.<moment>``), the names of
the checkpoint without wrapper prefixes, so what a checkpoint holds never depends on module identities, wrappers
or whether FSDP currently has a parameter gathered. Frozen parameters are not stored: they come back from the base
checkpoint (``trainer_state.json`` names it, so :func:`read_trainable_params` can rebuild the trained model). Each
rank writes its own local shard (``DTensor.to_local()``), so saving is parallel and needs no gather; resuming needs
the same world size (a clear error says so). A checkpoint is written into ``checkpoint-<step>.partial`` and renamed only after every rank has
finished and fsynced, so a crash or a full disk can never leave a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from internvl_tune.dist import DistInfo, barrier
from internvl_tune.errors import UserError

STATE_FILE = "trainer_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
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
    """Saves and restores the trainable state of a run (see the module docstring for the layout)."""

    def __init__(self, output_dir: Path, info: DistInfo, keep: int | None = None):
        self.output_dir = Path(output_dir)
        self.info = info
        self.keep = keep

    def _file(self, rank: int) -> str:
        return rank_file(rank, self.info.world_size)

    def save(self, step: int, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        """Write ``checkpoint-<step>`` atomically; every rank must call this. Returns the final path."""
        final = self.output_dir / f"checkpoint-{step}"
        partial = self.output_dir / f"checkpoint-{step}.partial"
        if self.info.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        tensors = _trainable_state(optimizer)
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.info.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.info.device).cpu()
        path = partial / self._file(self.info.rank)
        save_file(tensors, str(path), metadata={"step": str(step)})
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        barrier()
        if self.info.is_main:
            record = {**state, "step": step, "world_size": self.info.world_size}
            (partial / STATE_FILE).write_text(json.dumps(record, indent=2))
            _fsync_dir(partial)
            if final.exists():  # re-saving a step after a resume: replace the old copy last
                stale = final.with_name(final.name + ".old")
                final.rename(stale)
                partial.rename(final)
                shutil.rmtree(stale)
            else:
                partial.rename(final)
            _fsync_dir(self.output_dir)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        if not self.keep:
            return
        for old in list_checkpoints(self.output_dir)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: an explicit path, the newest one for ``"auto"``, or None."""
        if not resume:
            return None
        if resume == "auto":
            found = list_checkpoints(self.output_dir)
            return found[-1] if found else None
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise UserError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {STATE_FILE})")
        return path

    def load(self, path: Path, optimizer: torch.optim.Optimizer) -> dict:
        """Restore trainable parameters, optimizer moments and RNG states; returns the saved trainer state."""
        state = json.loads((Path(path) / STATE_FILE).read_text())
        if state["world_size"] != self.info.world_size:
            raise UserError(
                f"{path} was written by {state['world_size']} processes and this run has {self.info.world_size}; "
                f"resume with the same number of processes (GPUs)"
            )
        tensors = load_file(str(Path(path) / self._file(self.info.rank)))
        _restore_trainable_state(optimizer, tensors, path)
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.info.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.info.device)
        return state


def rank_file(rank: int, world_size: int) -> str:
    """The file name of one rank's part of a checkpoint."""
    return f"rank{rank:05d}-of-{world_size:05d}.safetensors"


def _named_params(optimizer: torch.optim.Optimizer):
    """``(name, parameter, group)`` of every parameter the optimizer updates (``build_param_groups`` names them)."""
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            yield name, p, group


def _trainable_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, p, _ in _named_params(optimizer):
        out[f"param.{name}"] = _local(p.detach()).contiguous().cpu()
        for key, value in optimizer.state.get(p, {}).items():
            out[f"optim.{name}.{key}"] = _local(value).detach().contiguous().cpu()
    return out


def _restore_trainable_state(optimizer: torch.optim.Optimizer, tensors: dict, path) -> None:
    expected = {f"param.{name}": _local(p).shape for name, p, _ in _named_params(optimizer)}
    stored = {k for k in tensors if k.startswith("param.")}
    if set(expected) != stored:
        missing, extra = sorted(set(expected) - stored), sorted(stored - set(expected))
        raise UserError(
            f"{path} does not match this run's trainable parameters (missing {missing[:5]}, unexpected {extra[:5]}); "
            f"resume with the same freeze / LoRA flags"
        )
    wrong = [f"{k[len('param.'):]}: {tuple(tensors[k].shape)} stored, {tuple(shape)} now"
             for k, shape in expected.items() if tensors[k].shape != shape]
    if wrong:
        raise UserError(f"{path} holds trainable parameters of other shapes ({'; '.join(wrong[:3])}): it was written "
                        f"with other LoRA ranks or model settings; resume with the flags of that run (its "
                        f"{STATE_FILE} lists them under 'config'), or start a new --output_dir")
    with torch.no_grad():
        for name, p, group in _named_params(optimizer):
            local = _local(p)
            local.copy_(tensors[f"param.{name}"].to(local.device, local.dtype))
            prefix = f"optim.{name}."
            st = {}
            for key in [k for k in tensors if k.startswith(prefix)]:
                value, field = tensors[key], key[len(prefix):]
                if field == "step":
                    st[field] = value.to(local.device if group.get("fused") else "cpu")
                else:
                    holder = torch.zeros_like(p)
                    _local(holder).copy_(value.to(_local(holder).device))
                    st[field] = holder
            if st:
                optimizer.state[p] = st


def read_trainable_params(path: str | Path) -> tuple[dict, dict[str, list[torch.Tensor]]]:
    """The trainer state of a checkpoint and its trainable parameters, as the ranks stored them.

    Returns:
        ``(trainer_state, {name: [rank 0's part, rank 1's part, ...]})``; FSDP shards each parameter along its first
        dimension in rank order, so ``torch.cat(parts)`` (or ``parts[0]`` for a replicated one) is the full tensor.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"{path}: not a complete training checkpoint (no {STATE_FILE})")
    state = json.loads((path / STATE_FILE).read_text())
    world = state["world_size"]
    parts: dict[str, list[torch.Tensor]] = {}
    for rank in range(world):
        file = path / rank_file(rank, world)
        if not file.is_file():
            raise UserError(f"{file} is missing: the checkpoint is incomplete")
        for key, value in load_file(str(file)).items():
            if key.startswith("param."):
                parts.setdefault(key[len("param."):], []).append(value)
    return state, parts


def load_checkpoint_model(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """A chat fine-tuning checkpoint (``checkpoint-N``) as an ``InternVLChat``: the base model its run started from,
    the run's trainable flags (LoRA layers included) and the trained tensors of the checkpoint.

    The run's configuration comes from the checkpoint's ``trainer_state.json`` (or, for checkpoints of older
    versions, the run directory's ``config.yaml``).
    """
    import dataclasses

    import yaml

    from internvl_tune.models.internvl_chat.chat import load_pretrained
    from internvl_tune.models.internvl_chat.recipe import ModelArgs, apply_trainable_flags

    path = Path(path)
    state, parts = read_trainable_params(path)
    config = state.get("config")
    if config is None and (path.parent / "config.yaml").is_file():
        config = yaml.safe_load((path.parent / "config.yaml").read_text())
    if not config or "model_name_or_path" not in config.get("model", {}):
        raise UserError(f"{path}: neither {STATE_FILE} nor {path.parent / 'config.yaml'} says which model the run "
                        "trained — not a checkpoint of `internvl-tune train`")
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in config["model"].items() if k in known})
    base = Path(args.model_name_or_path)
    if not base.is_dir():
        raise UserError(f"{path} was trained from {base}, which is not there any more — put the base checkpoint back "
                        "at that path")
    chat = load_pretrained(base, dtype=torch.float32, select_layer=args.vision_select_layer,
                           ps_version=args.ps_version)
    apply_trainable_flags(chat, args)
    params = dict(chat.model.named_parameters())
    with torch.no_grad():
        for name, pieces in parts.items():
            key = name.removeprefix("model.")
            if key not in params:
                raise UserError(f"{path}: trained tensor {name} has no place in {base} with the run's flags")
            target = params[key]
            full = pieces[0] if pieces[0].shape == target.shape else torch.cat(pieces)
            if full.shape != target.shape:
                raise UserError(f"{path}: {name} has shape {tuple(full.shape)}, the model {tuple(target.shape)}")
            target.copy_(full)
    chat.model.to(device=device, dtype=dtype).eval()
    return chat
