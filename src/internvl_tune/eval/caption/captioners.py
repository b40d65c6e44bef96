"""Adapters that give InternVL-G and InternVL2 chat models one ``caption(images) -> captions`` interface.

InternVL-G (InternVL-14B) captions with QLLaMA: the 96 queries read the image, then QLLaMA continues the plain text
prompt ``English caption:`` (no chat template), beam search 5, 8-30 new tokens. InternVL2 chat models answer the
question ``Provide a one-sentence caption for the provided image.`` through their chat template, greedy by default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from internvl_tune.data.images import resize_normalize
from internvl_tune.errors import CheckpointError

INTERNVL_G = "internvl_g"
INTERNVL_CHAT = "internvl_chat"


@dataclass(frozen=True)
class KindDefaults:
    """What the reference evaluation scripts use for each model kind."""

    prompt: str
    num_beams: int
    dtype: torch.dtype  # on CUDA; CPU runs use float32


DEFAULTS = {
    INTERNVL_G: KindDefaults("English caption:", 5, torch.float16),
    INTERNVL_CHAT: KindDefaults("Provide a one-sentence caption for the provided image.", 1, torch.bfloat16),
}


def detect_model_kind(path: str | Path) -> str:
    """Tell an InternVL-14B (InternVL-C/G) checkpoint from an InternVL2 chat one by its ``config.json``.

    InternVL-14B configs carry a ``qllama_config``; InternVL2 chat configs carry an ``llm_config`` (original layout)
    or a ``text_config`` (transformers-native layout). Both families may say ``model_type: internvl``.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found — --model must be a checkpoint folder with a config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file}: cannot read ({exc})") from None
    architectures = config.get("architectures") or []
    if "qllama_config" in config:
        return INTERNVL_G
    if "llm_config" in config or "text_config" in config or "InternVLChatModel" in architectures:
        return INTERNVL_CHAT
    raise CheckpointError(
        f"{config_file}: neither an InternVL-14B checkpoint (no `qllama_config`) nor an InternVL2 chat checkpoint "
        f"(no `llm_config` / `text_config`); architectures={architectures}"
    )


class InternVLGCaptioner:
    """Captions with an InternVL-14B ``InternVLModel`` (InternVL-G mode).

    Every image gets the same prompt, so a batch needs no padding: batched captions equal one-by-one captions.
    """

    def __init__(self, model, tokenizer, *, prompt: str = DEFAULTS[INTERNVL_G].prompt, num_beams: int = 5,
                 max_new_tokens: int = 30, min_new_tokens: int = 8, **generation_kwargs):
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.image_size = model.config.image_size
        # The prompt is tokenized with BOS and without EOS (the reference turns add_eos_token off).
        ids = tokenizer(prompt, add_special_tokens=True).input_ids
        if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
            ids = ids[:-1]
        self.prompt_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.generation_kwargs = dict(do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                      min_new_tokens=min_new_tokens, use_cache=True, pad_token_id=pad,
                                      **generation_kwargs)

    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[str]:
        pixel_values = torch.stack([resize_normalize(im, self.image_size) for im in images]).to(self.device, self.dtype)
        input_ids = self.prompt_ids.expand(len(images), -1)
        output = self.model.generate(pixel_values=pixel_values, input_ids=input_ids,
                                     attention_mask=torch.ones_like(input_ids), **self.generation_kwargs)
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in output]


class InternVLChatCaptioner:
    """Captions with an InternVL2 chat model (``models.internvl_chat.InternVLChat``) through its chat template.

    Images become tiles with the checkpoint's processor (one resized tile, or dynamic tiling); the batch is
    left-padded by ``batch_chat``, so batched answers equal one-by-one answers.
    """

    def __init__(self, chat, *, prompt: str = DEFAULTS[INTERNVL_CHAT].prompt, num_beams: int = 1,
                 max_new_tokens: int = 30, min_new_tokens: int = 8, temperature: float = 0.0):
        self.chat, self.prompt = chat, prompt
        self.generation_kwargs = dict(num_beams=num_beams, max_new_tokens=max_new_tokens,
                                      min_new_tokens=min_new_tokens, do_sample=temperature > 0)
        if temperature > 0:  # transformers warns about a temperature it does not use when greedy
            self.generation_kwargs["temperature"] = temperature

    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[str]:
        pixel_values, tiles = self.chat.image_processor(images)
        param = next(self.chat.model.parameters())
        pixel_values = pixel_values.to(param.device, param.dtype)
        return self.chat.batch_chat(pixel_values, [self.prompt] * len(images), tiles, **self.generation_kwargs)


def load_captioner(path: str | Path, kind: str, *, device, dtype: torch.dtype, prompt: str,
                   num_beams: int | None = None, max_new_tokens: int = 30, min_new_tokens: int = 8,
                   temperature: float = 0.0, dynamic: bool = False, max_num: int = 6, log=None):
    """Load a checkpoint of ``kind`` and wrap it; returns ``(captioner, generation settings actually used)``.

    The settings follow the reference scripts: InternVL-G decodes with beam search (5 unless given); chat models
    default to greedy and are forced to one beam when over 20B parameters or with ``dynamic`` tiling.
    """
    log = log or (lambda _msg: None)
    if kind == INTERNVL_G:
        from internvl_tune.models.internvl_cg.loading import load_internvl_cg
        from internvl_tune.models.internvl_cg.tokenizer import load_tokenizer

        model = load_internvl_cg(path, dtype=dtype, device=device)
        tokenizer = load_tokenizer(path, add_eos_token=False)
        beams = DEFAULTS[INTERNVL_G].num_beams if num_beams is None else num_beams
        captioner = InternVLGCaptioner(model, tokenizer, prompt=prompt, num_beams=beams,
                                       max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
        log(f"InternVL-G: image size {captioner.image_size}, prompt {prompt!r}")
        return captioner, dict(captioner.generation_kwargs, prompt=prompt)
    from internvl_tune.models.internvl_chat import load_pretrained as load_chat

    # The reference tiles with min 1 and max --max-num tiles, the checkpoint's thumbnail setting, only with --dynamic.
    chat = load_chat(path, dtype=dtype, device=device, dynamic_image_size=dynamic, min_dynamic_patch=1,
                     max_dynamic_patch=max_num)
    beams = DEFAULTS[INTERNVL_CHAT].num_beams if num_beams is None else num_beams
    billions = sum(p.numel() for p in chat.model.parameters()) / 1e9
    if beams != 1 and (billions > 20 or dynamic):
        log(f"{billions:.1f}B parameters{', dynamic tiling' if dynamic else ''}: using num_beams 1 (as the reference)")
        beams = 1
    captioner = InternVLChatCaptioner(chat, prompt=prompt, num_beams=beams, max_new_tokens=max_new_tokens,
                                      min_new_tokens=min_new_tokens, temperature=temperature)
    log(f"InternVL2 chat ({chat.family}, template {chat.template}): {billions:.2f}B parameters, image size "
        f"{chat.image_size}, dynamic {dynamic}, max tiles {max_num}, prompt {prompt!r}")
    return captioner, dict(captioner.generation_kwargs, prompt=prompt, dynamic=dynamic, max_num=max_num)
