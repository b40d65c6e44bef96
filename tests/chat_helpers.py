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
