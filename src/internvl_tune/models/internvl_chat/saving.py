"""Saving InternVL2 checkpoints in the original layout (reference, vLLM, lmdeploy) or the transformers-native one.

Both layouts are written into a temporary sibling directory that is renamed into place at the end, so an interrupted
save never leaves a half-written checkpoint under the target name. Files that are not weights or configs (tokenizer
files, remote-code ``.py`` files of the release, ``generation_config.json``) are copied from the source checkpoint.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch

from internvl_tune.errors import CheckpointError
from internvl_tune.models.internvl_chat.config import SIDECAR
from internvl_tune.models.internvl_chat.key_map import LayoutSpec, to_original

MAX_SHARD_BYTES = 5 * 2**30
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth")
_NOT_COPIED_NAMES = {"config.json", SIDECAR}


def write_shards(out: Path, state: dict[str, torch.Tensor], num_shards: int | None = None) -> None:
    """Write ``state`` as ``model.safetensors`` or as numbered shards plus ``model.safetensors.index.json``.

    Args:
        out: existing directory.
        state: tensors by key (made contiguous; shared storage is not allowed by safetensors).
        num_shards: force this many shards; default: as many as needed to stay under 5 GiB each.
    """
    from safetensors.torch import save_file

    keys = list(state)
    sizes = [state[k].numel() * state[k].element_size() for k in keys]
    total = sum(sizes)
    count = num_shards or max(1, -(-total // MAX_SHARD_BYTES))
    if count == 1:
        save_file({k: state[k].contiguous() for k in keys}, str(out / "model.safetensors"), metadata={"format": "pt"})
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
        save_file({k: state[k].contiguous() for k in group}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    return _DTYPE_NAMES.get(next(iter(state.values())).dtype, "float32")


def write_original_checkpoint(out: Path, native_state: dict[str, torch.Tensor], original: dict,
                              num_shards: int | None = None) -> None:
    """Weights (original key names) and config.json of the original layout into ``out``."""
    spec = LayoutSpec.from_original(original)
    state = to_original(native_state, spec)
    config = json.loads(json.dumps(original))
    embed = next(v for k, v in state.items() if k.endswith(("embed_tokens.weight", "tok_embeddings.weight")))
    config["llm_config"]["vocab_size"] = embed.shape[0]
    config["torch_dtype"] = config["llm_config"]["torch_dtype"] = _dtype_name(state)
    write_shards(out, state, num_shards)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_native_checkpoint(out: Path, native_state: dict[str, torch.Tensor], native_config, original: dict) -> None:
    """Weights, config.json (``InternVLForConditionalGeneration``) and the original config sidecar into ``out``."""
    native_config = copy.deepcopy(native_config)
    native_config.text_config.vocab_size = native_state["lm_head.weight"].shape[0]
    native_config.dtype = _dtype_name(native_state)
    native_config.architectures = ["InternVLForConditionalGeneration"]
    write_shards(out, native_state)
    native_config.to_json_file(str(out / "config.json"))
    (out / SIDECAR).write_text(json.dumps(original, indent=2, sort_keys=True) + "\n")


def copy_aux_files(source: Path | None, out: Path) -> None:
    """Copy tokenizer / generation / remote-code files of the source checkpoint (never weights or configs)."""
    if source is None:
        return
    for file in sorted(source.iterdir()):
        if file.is_file() and file.name not in _NOT_COPIED_NAMES and not file.name.endswith(_NOT_COPIED_SUFFIXES):
            shutil.copy2(file, out / file.name)


def atomic_directory(target: Path, overwrite: bool):
    """Context manager yielding a temp directory that replaces ``target`` when the block succeeds."""
    import contextlib

    @contextlib.contextmanager
    def _ctx():
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise CheckpointError(f"{target} already exists and is not empty — choose a new directory or overwrite it")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{tmp.name[-8:]}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    return _ctx()


def save_chat(chat, out_dir: str | Path, layout: str = "original", overwrite: bool = False) -> Path:
    """Save an ``InternVLChat`` (weights, config, tokenizer files) in ``layout`` into ``out_dir`` atomically."""
    if layout not in ("original", "native"):
        raise CheckpointError(f"unknown layout {layout!r}; use 'original' or 'native'")
    if layout == "native" and chat.ps_version == "v1":
        raise CheckpointError(
            "this checkpoint uses pixel shuffle v1 (ps_version='v1'), which transformers' native InternVL cannot "
            "express (its features would come out transposed) — keep the original layout for this model"
        )
    from internvl_tune.models.internvl_chat.lora import has_lora

    if has_lora(chat):
        raise CheckpointError("the model still holds LoRA adapters — merge them (merge_lora) or save the adapter alone")
    target = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in chat.model.state_dict().items()}
    with atomic_directory(target, overwrite) as tmp:
        copy_aux_files(chat.source_dir, tmp)
        if chat.tokens_added:
            chat.tokenizer.save_pretrained(str(tmp))
        if layout == "original":
            write_original_checkpoint(tmp, state, chat.original_config)
        else:
            write_native_checkpoint(tmp, state, chat.model.config, chat.original_config)
    return target
