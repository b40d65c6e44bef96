"""A new InternVL chat model from its parts: an InternViT checkpoint, an LLM checkpoint and, optionally, a trained
projector — what the reference's fine-tuning builds from ``--vision_path`` / ``--llm_path`` / ``--mlp_path`` (the
first stage of its InternVL3.5-GPT-OSS recipe warms the new projector up on them).

As the reference does it:

- the config is an ``InternVLChatConfig`` of the ViT's config, the LLM's config and the chat settings given (template,
  pixel shuffle, feature layer, tiling); for GPT-OSS ``output_router_logits`` is switched on, as its stage 0 saves it;
- the new projector (``mlp1``: LayerNorm, Linear, GELU, Linear) has PyTorch's default initialisation (LayerNorm 1 / 0,
  Linear weights and biases uniform in +-1/sqrt(fan_in)), drawn from ``seed``, in fp32 and then cast; or it is read
  from ``mlp_path`` (its six tensors, ``0.weight`` ... ``3.bias``, with or without the ``mlp1.`` prefix; safetensors, or
  a ``.bin`` read as tensors only);
- the LLM's tokenizer gets the nine InternVL tokens; when they are new, the embeddings are resized to the tokenizer's
  length (so an LLM whose embedding has spare rows, as Qwen3's and gpt-oss's, shrinks to it), the LM head's rows of
  the new tokens are the mean of its other rows and a grown input embedding's new rows the mean of the old ones (the
  reference's transformers samples them around that mean with 1e-9 times the rows' covariance).

Every tensor of the parts must land on a parameter of the model and every parameter but the new projector must get
one (the strict loader of ``loading.py``, whose errors name the file of each offender); MXFP4 experts (gpt-oss) are
dequantized and Qwen3-MoE's per-expert tensors stacked as in any checkpoint. An LLM with tied embeddings and no LM
head in its files gets a copy of its embeddings as the head (untied, as the InternVL3.5 releases are). The result
is an ``InternVLChat``; ``save_pretrained`` writes it as a normal original-layout checkpoint.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from internvl_tune.errors import CheckpointError, UserError
from internvl_tune.models.common.weights import file_keys, iter_file_tensors, weight_files
from internvl_tune.models.internvl_chat import config as cfg
from internvl_tune.models.internvl_chat import families

# The chat settings of InternVLChatConfig a model built from parts takes from the run (the reference's flags).
SETTINGS = ("template", "downsample_ratio", "ps_version", "select_layer", "dynamic_image_size", "use_thumbnail",
            "min_dynamic_patch", "max_dynamic_patch", "force_image_size")
PROJECTOR_KEYS = ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")


def parts_config(vision_path, llm_path, settings: dict) -> dict:
    """The original ``InternVLChatConfig`` dict of a model built from these parts (no weight is read).

    ``settings``: every key of :data:`SETTINGS` (``force_image_size`` None: the ViT's own image size).
    """
    vision_path, llm_path = Path(vision_path), Path(llm_path)
    vision = cfg.read_json(_dir(vision_path, "--vision_path") / "config.json")
    if "InternVisionModel" not in (vision.get("architectures") or []):
        raise CheckpointError(f"{vision_path / 'config.json'}: not an InternViT checkpoint (architectures "
                              f"{vision.get('architectures')}, InternVisionModel expected) — pass the folder of an "
                              "InternViT release such as InternViT-300M-448px-V2_5")
    llm = cfg.read_json(_dir(llm_path, "--llm_path") / "config.json")
    architecture = (llm.get("architectures") or [None])[0]
    family = families.by_architecture(architecture)
    if family is None:
        raise CheckpointError(f"{llm_path / 'config.json'}: LLM architecture {architecture!r} is not supported; "
                              f"known: {', '.join(families.architectures())}")
    quantization = llm.pop("quantization_config", None)
    if quantization and quantization.get("quant_method") != "mxfp4":
        raise CheckpointError(f"{llm_path / 'config.json'}: quantization_config {quantization.get('quant_method')!r} "
                              "cannot be trained on: use the LLM's bf16 weights (MXFP4 experts are dequantized)")
    if family.moe is not None and family.moe.aux_loss_always:  # the reference's GPT-OSS training switches it on
        llm["output_router_logits"] = True
    size = settings.get("force_image_size") or vision.get("image_size", 224)
    if size != vision.get("image_size", 224):
        raise UserError(f"--force_image_size {size} differs from the ViT's image_size {vision.get('image_size')} "
                        f"({vision_path}): its position embeddings are built for that size; pass --force_image_size "
                        f"{vision.get('image_size')}")
    missing = [k for k in SETTINGS if k not in settings]
    if missing:
        raise ValueError(f"parts_config needs the settings {missing}")
    return {
        **cfg.CHAT_DEFAULTS, **{k: settings[k] for k in SETTINGS}, "force_image_size": size,
        "architectures": ["InternVLChatModel"], "auto_map": dict(cfg.ORIGINAL_AUTO_MAP), "model_type": "internvl_chat",
        "vision_config": vision, "llm_config": llm, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def build_from_parts(vision_path, llm_path, settings: dict, mlp_path=None, dtype: torch.dtype = torch.bfloat16,
                     seed: int = 0):
    """The ``InternVLChat`` built from an InternViT checkpoint, an LLM checkpoint and a new (or given) projector
    (see the module docstring); its ``save_pretrained`` writes a normal checkpoint."""
    from internvl_tune.models.internvl_chat.chat import InternVLChat
    from internvl_tune.models.internvl_chat.key_map import LayoutSpec
    from internvl_tune.models.internvl_chat.loading import build_empty_model, load_weights
    from internvl_tune.models.internvl_chat.tokenizers import add_internvl_tokens, load_tokenizer

    vision_path, llm_path = Path(vision_path), Path(llm_path)
    original = parts_config(vision_path, llm_path, settings)
    family = cfg.family_of(original)
    tokenizer = load_tokenizer(llm_path, family.name, internvl_tokens=False)
    added = add_internvl_tokens(tokenizer)
    native = cfg.native_config(original, tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    model = build_empty_model(native)
    if family.moe:
        from internvl_tune.models.common import moe

        model.model.language_model.set_experts_implementation(moe.register())
    if mlp_path is None:
        _new_projector(model.model.multi_modal_projector, dtype, seed)
    spec = LayoutSpec.from_original(original)
    tensors = _part_tensors(vision_path, llm_path, None if mlp_path is None else Path(mlp_path), original, spec)
    try:
        load_weights(model, llm_path, "original", spec, dtype, "cpu", tensors=tensors)
    except CheckpointError as exc:  # its listing names each tensor (vision_model.* / language_model.* / mlp1.*)
        listing = "\n".join(line for line in str(exc).splitlines()[1:] if not line.lstrip().startswith("fix:"))
        raise CheckpointError(
            f"--vision_path {vision_path} and --llm_path {llm_path} do not make an InternVL model:\n{listing}\n  fix: "
            "pass an InternViT checkpoint and an LLM checkpoint of a supported family, each complete; a projector "
            "file (--mlp_path) holds mlp1's six tensors") from None
    model.eval()
    if added:
        original = cfg.with_vocab_size(original, len(tokenizer))
        _resize_vocabulary(model, len(tokenizer), added)
    return InternVLChat(model, tokenizer, original, source_dir=llm_path, tokens_added=added)


def _dir(path: Path, flag: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{flag} {path}: not a directory — pass the folder that holds config.json and the weights")
    return path


def _new_projector(projector: nn.Module, dtype: torch.dtype, seed: int) -> None:
    """PyTorch's default initialisation of every LayerNorm and Linear of ``projector`` (fp32, seeded, then cast)."""
    projector.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in projector.modules():
            if isinstance(module, (nn.LayerNorm, nn.Linear)):
                module.float().reset_parameters()
    projector.to(dtype)


def _part_tensors(vision_path: Path, llm_path: Path, mlp_path: Path | None, original: dict,
                  spec) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """``(original key, tensor, file)`` of every tensor of the parts: the ViT's under ``vision_model.``, the LLM's
    under ``language_model.`` (plus its embeddings as the LM head when it ties them and stores none), the
    projector file's under ``mlp1.``."""
    from internvl_tune.models.internvl_chat.key_map import original_name

    for file in weight_files(vision_path):
        for key, tensor in iter_file_tensors(file):
            yield "vision_model." + key, tensor, file
    prefix = "language_model."
    embed = original_name(families.T + "embed_tokens.weight", spec).removeprefix(prefix)
    head = original_name("lm_head.weight", spec).removeprefix(prefix)
    files = weight_files(llm_path)
    tied = original["llm_config"].get("tie_word_embeddings") and not any(head in file_keys(f) for f in files)
    for file in files:
        for key, tensor in iter_file_tensors(file):
            yield prefix + key, tensor, file
            if tied and key == embed:
                yield prefix + head, tensor.clone(), file
    if mlp_path is None:
        return
    if not mlp_path.is_file():
        raise UserError(f"--mlp_path {mlp_path}: no such file — pass the projector weights a warm-up run saved "
                        "(mlp1's six tensors, safetensors or .bin)")
    for key, tensor in iter_file_tensors(mlp_path):
        yield "mlp1." + key.removeprefix("mlp1."), tensor, mlp_path


@torch.no_grad()
def _resize_vocabulary(model: nn.Module, size: int, added: int) -> None:
    """The reference's resize to the tokenizer once it added ``added`` tokens (see the module docstring)."""
    embed = model.get_input_embeddings().weight
    old = embed.shape[0]
    mean = embed.float().mean(dim=0, keepdim=True).to(embed.dtype)
    model.resize_token_embeddings(size, mean_resizing=False)
    if size > old:
        model.get_input_embeddings().weight[old:] = mean
    head = model.get_output_embeddings().weight
    head[-added:] = head[:-added].float().mean(dim=0, keepdim=True).to(head.dtype)
    model.config.text_config.vocab_size = size


PROVENANCE = "assembled_from.json"


def save_model_from_parts(out_dir, vision_path, llm_path, settings: dict, mlp_path=None, seed: int = 0) -> bool:
    """Build the model from its parts (:func:`build_from_parts`, bf16) and save it into ``out_dir`` (original layout)
    with ``assembled_from.json`` saying what it was built from; a folder built from the same parts, settings and seed
    is kept as it is (a resumed run). Returns True when it built."""
    out = Path(out_dir)
    wanted = {"vision_path": str(Path(vision_path).resolve()), "llm_path": str(Path(llm_path).resolve()),
              "mlp_path": None if mlp_path is None else str(Path(mlp_path).resolve()),
              "settings": copy.deepcopy(settings), "seed": seed}
    if (out / PROVENANCE).is_file() and json.loads((out / PROVENANCE).read_text()) == wanted:
        return False
    chat = build_from_parts(vision_path, llm_path, settings, mlp_path=mlp_path, seed=seed)
    chat.save_pretrained(out, layout="original", overwrite=True)
    (out / PROVENANCE).write_text(json.dumps(wanted, indent=2) + "\n")
    return True
