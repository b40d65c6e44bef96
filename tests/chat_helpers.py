"""Helpers of the chat-model tests: an image prompt for a loaded model, its logits, and a short training run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample"


def image_inputs(chat, tiles: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [1, L], pixel_values [tiles, 3, S, S])``: random tiles and a question about them."""
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(tiles, 3, chat.image_size, chat.image_size, generator=gen)
    prompt = "<img>" + "<IMG_CONTEXT>" * (chat.num_image_token * tiles) + "</img>\nWhat is in the picture?"
    return chat.tokenizer(prompt, return_tensors="pt").input_ids, pixel_values


def chat_logits(chat, ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids`` with the image features of ``pixel_values`` in place."""
    with torch.no_grad():
        return chat.model(inputs_embeds=chat.embed_inputs(ids, pixel_values)).logits


def train_on_sample(model, out: Path, steps: int = 2, **model_flags) -> tuple[list[float], str]:
    """``steps`` steps of ``internvl-tune train`` in-process on the sample images (ViT frozen, no --conv_style);
    returns (losses, the resolved template)."""
    from internvl_tune.data.config import DataConfig
    from internvl_tune.models.internvl_chat.recipe import ChatRecipe, ModelArgs
    from internvl_tune.train.config import RunConfig, TrainArgs
    from internvl_tune.train.trainer import run

    meta = out.parent / f"{out.name}-meta.json"
    meta.write_text(json.dumps({"sample_image": {"root": str(SAMPLE / "images"), "annotation": str(SAMPLE / "image.jsonl"),
                                                 "data_augment": False, "repeat_time": 1, "length": 14}}))
    cfg = RunConfig(
        model=ModelArgs(model_name_or_path=str(model), freeze_backbone=True, grad_checkpoint="False", **model_flags),
        data=DataConfig(meta_path=str(meta), max_dynamic_patch=2, max_seq_length=1024),
        train=TrainArgs(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
                        logging_steps=1, save_steps=1000, dataloader_num_workers=0, report_to="none", seed=0))
    recipe = ChatRecipe(cfg.model, cfg.data)
    return run(recipe, cfg).losses, recipe.data.conv_style


SPARE_ROWS = 7  # embedding rows an LLM checkpoint has beyond its tokenizer (as Qwen3's and gpt-oss's have)


def write_tiny_parts(like: str, out: Path, seed: int = 1, mxfp4_experts: bool = False) -> tuple[Path, Path, Path]:
    """The parts of a tiny ``like`` model as their own releases ship them: ``(whole, vit, llm)`` directories.

    ``whole`` is the tiny InternVL checkpoint; ``vit`` its InternViT alone (InternVisionModel keys and config);
    ``llm`` its LLM alone (the LLM's own keys and config, its tokenizer without the nine InternVL tokens, and
    ``SPARE_ROWS`` more embedding rows than the tokenizer has ids); ``mxfp4_experts``: GPT-OSS experts in MXFP4 with
    the release's ``quantization_config``, as openai's gpt-oss files are."""
    from safetensors.torch import load_file, save_file

    from internvl_tune.constants import SPECIAL_TOKENS
    from internvl_tune.models.common import mxfp4
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    whole = write_tiny_checkpoint(like, out / "whole", seed=seed)
    config = json.loads((whole / "config.json").read_text())
    state = {}
    for file in sorted(whole.glob("model*.safetensors")):
        state.update(load_file(str(file)))
    vit, llm = out / "vit", out / "llm"
    vit.mkdir()
    llm.mkdir()
    (vit / "config.json").write_text(json.dumps({**config["vision_config"], "architectures": ["InternVisionModel"]}))
    save_file({k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")},
              str(vit / "model.safetensors"))
    llm_state = {k.removeprefix("language_model."): v for k, v in state.items() if k.startswith("language_model.")}
    gen = torch.Generator().manual_seed(seed)
    for key in [k for k in llm_state if k.endswith(("embed_tokens.weight", "lm_head.weight"))]:
        spare = torch.randn(SPARE_ROWS, llm_state[key].shape[1], generator=gen).to(llm_state[key].dtype)
        llm_state[key] = torch.cat([llm_state[key], spare])
    llm_config = {**config["llm_config"], "vocab_size": config["llm_config"]["vocab_size"] + SPARE_ROWS}
    if mxfp4_experts:
        for key in [k for k in llm_state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            llm_state[key + "_blocks"], llm_state[key + "_scales"] = mxfp4.quantize(llm_state.pop(key))
        llm_config["quantization_config"] = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                        "model.embed_tokens", "lm_head"],
                                             "quant_method": "mxfp4"}
    save_file(llm_state, str(llm / "model.safetensors"))
    (llm / "config.json").write_text(json.dumps(llm_config))
    for file in whole.iterdir():  # the tokenizer files, without the InternVL tokens
        if file.suffix == ".json" and file.name not in ("config.json", "model.safetensors.index.json") \
                or file.name in ("vocab.json", "merges.txt", "tokenizer.model"):
            (llm / file.name).write_bytes(file.read_bytes())
    for name, field in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        if not (llm / name).is_file():
            continue
        data = json.loads((llm / name).read_text())
        if isinstance(data.get(field), list):
            data[field] = [t for t in data[field] if t["content"] not in SPECIAL_TOKENS]
        elif isinstance(data.get(field), dict):
            data[field] = {i: t for i, t in data[field].items() if t["content"] not in SPECIAL_TOKENS}
        (llm / name).write_text(json.dumps(data))
    return whole, vit, llm
