"""Strict, streamed loading (and saving) of InternVL-14B checkpoints in the reference layout.

A checkpoint directory holds ``config.json`` and the weights as ``model.safetensors``, sharded
``model-*.safetensors`` + ``model.safetensors.index.json``, or legacy ``pytorch_model*.bin`` (read with
``torch.load(weights_only=True)``, never unpickling code). Loading is strict: every tensor in the files must land in
a parameter and every parameter must be filled, else ``CheckpointError`` names the offenders.

The model is built on the meta device and its storage allocated directly in the target dtype/device; tensors are then
copied in one at a time, so peak host memory is one tensor, not the whole 27 GB state dict.

Also handled, as the reference's loaders do:

* ``force_image_size``: a checkpoint whose position embeddings are at the vision ``image_size`` grid is
  interpolated (bicubic) to ``force_image_size`` (224 -> 364 for the fine-tuning recipes);
* checkpoints saved with PEFT LoRA wrappers (``use_backbone_lora`` / ``use_qllama_lora`` in the config,
  keys under ``vision_model.base_model.model.`` / ``qllama.base_model.model.``) are merged on load,
  ``W + (lora_alpha / r) * B @ A`` with the reference's ``lora_alpha = 2 r``;
* tied embeddings (``tie_word_embeddings``, on unless the config turns it off): ``qllama.lm_head.weight`` and
  ``qllama.model.embed_tokens.weight`` are one matrix; when the files hold both, the lm_head's values win, as in the
  reference (it loads the two into the tied parameter in module order, lm_head last); either one alone fills it;
* ``rotary_emb.inv_freq`` buffers written by older transformers versions are checked against the values the model
  recomputes, then dropped.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from internvl_tune.errors import CheckpointError
from internvl_tune.models.common.weights import file_keys, iter_file_tensors, weight_files, write_shards
from internvl_tune.models.internvl_cg.config import InternVLCGConfig
from internvl_tune.models.internvl_cg.intern_vit import interpolate_pos_embedding
from internvl_tune.models.internvl_cg.model import InternVLModel
from internvl_tune.models.internvl_cg.qllama import ROPE_BASE

POS_EMBED_KEY = "vision_model.embeddings.position_embedding"
EMBED_KEY, LM_HEAD_KEY = "qllama.model.embed_tokens.weight", "qllama.lm_head.weight"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_PEFT_PREFIX = re.compile(r"^(vision_model|qllama)\.base_model\.model\.")
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_INV_FREQ = re.compile(r"\.rotary_emb\.inv_freq$")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def load_internvl_cg(
    path: str | Path,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    force_image_size: int | None = None,
    drop_path_rate: float | None = None,
    weights: bool = True,
) -> InternVLModel:
    """Load an InternVL-14B (InternVL-C/G) checkpoint directory strictly.

    Args:
        path: directory with ``config.json`` and the weights.
        dtype: parameter dtype (``torch.bfloat16`` / ``float16`` / ``float32`` or ``"bf16"`` / ``"fp16"`` / ``"fp32"``).
        device: where the parameters live.
        force_image_size: run at this input size (the position embeddings are interpolated when the checkpoint
            has them at the vision ``image_size``); default: the config's ``force_image_size`` or ``image_size``.
        drop_path_rate: override the ViT's stochastic depth (training).
        weights: False builds the structure only, with parameters on the meta device in ``dtype`` (for ranks that
            receive their weights from rank 0, and for exporting gathered weights).

    Returns:
        The model in eval mode, with ``model.config.force_image_size`` describing the loaded resolution.
    """
    path = Path(path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
        dtype = DTYPES[dtype]
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json — point at the directory of an InternVL-14B checkpoint")
    config = InternVLCGConfig.from_file(path / "config.json")
    if force_image_size and force_image_size != config.vision_config.image_size:
        config.force_image_size = force_image_size
    if drop_path_rate is not None:
        config.vision_config.drop_path_rate = drop_path_rate
    if not weights:
        with torch.device("meta"):
            model = InternVLModel(config).to(dtype)
        config.use_backbone_lora = config.use_qllama_lora = 0
        return model.eval()
    files = weight_files(path)

    keys = {_canonical(k) for f in files for k in file_keys(f)}
    lora = _collect_lora(files, config)
    with torch.device("meta"):
        model = InternVLModel(config)
    model = model.to(dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives every name its own storage; tie again
        model.qllama.lm_head.weight = model.qllama.model.embed_tokens.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    shadowed = {EMBED_KEY} if config.tie_word_embeddings and LM_HEAD_KEY in keys else set()
    filled: set[str] = set()
    for file in files:
        for raw_key, tensor in iter_file_tensors(file):
            key = _canonical(raw_key)
            if _LORA.match(key):
                continue  # merged below, together with its base weight
            if key in shadowed:
                filled.add(key)
                continue
            if _INV_FREQ.search(key):
                _check_inv_freq(file, raw_key, tensor, config)
                continue
            if key not in params:
                raise CheckpointError(f"{file}: unexpected tensor {raw_key!r} — not a parameter of InternVL-14B "
                                      "(is this an InternVL2 chat checkpoint, or a different model?)")
            tensor = _fit(key, tensor, params[key], config, file)
            if key[: -len(".weight")] in lora:
                tensor = _merge_lora(tensor, *lora[key[: -len(".weight")]])
            with torch.no_grad():
                params[key].copy_(tensor)
            filled.add(key)
    if config.tie_word_embeddings and filled & {EMBED_KEY, LM_HEAD_KEY}:
        filled |= {EMBED_KEY, LM_HEAD_KEY}
    missing = sorted(set(params) - filled)
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} parameters are missing from the checkpoint, e.g. {', '.join(missing[:8])} — "
            "the files are incomplete or belong to a different architecture"
        )
    config.use_backbone_lora = config.use_qllama_lora = 0
    if model.vision_model.image_size != config.vision_config.image_size:
        config.force_image_size = model.vision_model.image_size
    return model.eval()


def _canonical(raw_key: str) -> str:
    """Strip PEFT wrapper prefixes (``.base_model.model.``, ``.base_layer.``) to the plain parameter name."""
    return _PEFT_PREFIX.sub(r"\1.", raw_key).replace(".base_layer.", ".")


def _fit(key: str, tensor: torch.Tensor, param: torch.Tensor, config: InternVLCGConfig, file: Path) -> torch.Tensor:
    """Check the shape; interpolate position embeddings stored at another grid (the reference's resize)."""
    if tensor.shape == param.shape:
        return tensor
    if key == POS_EMBED_KEY and tensor.ndim == 3 and tensor.shape[2] == param.shape[2]:
        new_grid = int(round((param.shape[1] - 1) ** 0.5))
        return interpolate_pos_embedding(tensor, new_grid)
    raise CheckpointError(
        f"{file}: {key} has shape {tuple(tensor.shape)} but the config gives {tuple(param.shape)} — "
        "config.json does not match the weights"
    )


def _collect_lora(files: list[Path], config: InternVLCGConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``module -> (A, B, scaling)`` for every LoRA pair in the checkpoint (small; kept in memory for the merge)."""
    keys = {k: f for f in files for k in file_keys(f)}
    if not any(_LORA.match(_canonical(k)) for k in keys):
        return {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for file in {f for k, f in keys.items() if _LORA.match(_canonical(k))}:
        for raw_key, tensor in iter_file_tensors(file):
            m = _LORA.match(_canonical(raw_key))
            if m:
                pairs.setdefault(m["module"], {})[m["ab"]] = tensor.float()
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"LoRA weights of {module} are incomplete (have {sorted(ab)}, need A and B)")
        rank = config.use_backbone_lora if module.startswith("vision_model.") else config.use_qllama_lora
        if rank != ab["A"].shape[0]:
            raise CheckpointError(
                f"LoRA rank of {module} is {ab['A'].shape[0]} but config.json says "
                f"{'use_backbone_lora' if module.startswith('vision_model.') else 'use_qllama_lora'}={rank}"
            )
        out[module] = (ab["A"], ab["B"], 2.0)  # the reference wraps with lora_alpha = 2 * r
    return out


def _merge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return (weight.float() + scaling * (b @ a)).to(weight.dtype)


def _check_inv_freq(file: Path, key: str, tensor: torch.Tensor, config: InternVLCGConfig) -> None:
    head_dim = config.qllama_config.hidden_size // config.qllama_config.num_attention_heads
    expected = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected, rtol=1e-3):
        raise CheckpointError(f"{file}: {key} differs from the rotary frequencies QLLaMA uses (base {ROPE_BASE:g})")


def save_internvl_cg(model: InternVLModel, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                     max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``model`` in the reference layout (config.json + safetensors shards + index), loadable by the
    reference code and by ``load_internvl_cg``; tokenizer files are copied from ``tokenizer_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # clone(): tied parameters appear under two names and safetensors refuses shared storage.
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    write_shards(out, state, max_shard_bytes=max_shard_bytes)
    model.config.save(out / "config.json")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, out / name)  # (the umask decides the mode)
    return out
