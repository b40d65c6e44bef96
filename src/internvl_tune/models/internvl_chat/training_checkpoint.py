"""A chat fine-tuning checkpoint (``<output_dir>/checkpoint-N``) as an ``InternVLChat``, for chat, merge-lora and
convert: the base model its run started from, the run's trainable flags (LoRA layers included) and the trained
tensors of that step, read whole from however many rank files wrote them (``models/common/checkpoint_files.py``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from internvl_tune.errors import CheckpointError
from internvl_tune.models.common.checkpoint_files import STATE_FILE, read_trainable_params


def is_training_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a ``checkpoint-N`` folder of ``internvl-tune train``."""
    return (Path(path) / STATE_FILE).is_file()


def load_checkpoint_model(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """The checkpoint ``path`` as an ``InternVLChat`` (see the module docstring); every file is verified against the
    checkpoint's manifest first, so a damaged one is a CheckpointError naming it.

    The run's configuration comes from the checkpoint's ``trainer_state.json`` (or, for checkpoints of older
    versions, the run directory's ``config.yaml``).
    """
    import yaml

    from internvl_tune.models.internvl_chat.chat import load_pretrained
    from internvl_tune.models.internvl_chat.recipe import ModelArgs, apply_trainable_flags

    path = Path(path)
    state, params = read_trainable_params(path)
    config = state.get("config")
    if config is None and (path.parent / "config.yaml").is_file():
        config = yaml.safe_load((path.parent / "config.yaml").read_text())
    if not config or "model_name_or_path" not in config.get("model", {}):
        raise CheckpointError(f"{path}: neither {STATE_FILE} nor {path.parent / 'config.yaml'} says which model the "
                              "run trained — not a checkpoint of `internvl-tune train`")
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in config["model"].items() if k in known})
    base = Path(args.model_name_or_path)
    if not base.is_dir():
        raise CheckpointError(f"{path} was trained from {base}, which is not there any more — put the base checkpoint "
                              "back at that path")
    chat = load_pretrained(base, dtype=torch.float32, select_layer=args.vision_select_layer,
                           ps_version=args.ps_version)
    apply_trainable_flags(chat, args)
    own = dict(chat.model.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            key = name.removeprefix("model.")
            if key not in own:
                raise CheckpointError(f"{path}: trained tensor {name} has no place in {base} with the run's flags")
            if value.shape != own[key].shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(value.shape)}, the model "
                                      f"{tuple(own[key].shape)}")
            own[key].copy_(value)
    chat.model.to(device=device, dtype=dtype).eval()
    return chat
