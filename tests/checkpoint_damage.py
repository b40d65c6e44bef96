"""Test helper: damage a tiny sharded checkpoint in place, keeping its index consistent."""

import json

from safetensors.torch import load_file, save_file


def edit_shard(path, edit):
    """Apply ``edit(state_dict)`` to the last shard of the checkpoint at ``path`` and rewrite its index entries."""
    shard = path / "model-00002-of-00002.safetensors"
    state = load_file(str(shard))
    edit(state)
    save_file(state, str(shard), metadata={"format": "pt"})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in state})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
