"""Helpers of the chat-model tests: an image prompt for a loaded model, and its logits."""

from __future__ import annotations

import torch


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
