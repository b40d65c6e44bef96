"""``InternVLChat``: an InternVL2 chat model on transformers' native modules, and ``load_pretrained``.

Image features follow the reference: the InternViT hidden state of ``select_layer`` without its CLS token, pixel
shuffle (v2 is transformers' own; v1 leaves height and width swapped, so we do it here), the ``mlp1`` projector, and
the result written into the token embeddings at the ``<IMG_CONTEXT>`` positions.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from internvl_tune.constants import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_tune.data.batching import image_layout
from internvl_tune.errors import CheckpointError, UserError
from internvl_tune.models.common.drop_path import add_drop_path
from internvl_tune.models.common.quantize import check_4bit_device, to_4bit_linears
from internvl_tune.models.internvl_chat import config as cfg
from internvl_tune.models.internvl_chat import families
from internvl_tune.models.internvl_chat.key_map import LayoutSpec
from internvl_tune.models.internvl_chat.loading import build_empty_model, load_weights
from internvl_tune.models.internvl_chat.tokenizers import load_tokenizer


def build_prompt(template_name: str, history: list[tuple[str, str]], question: str,
                 system_message: str | None = None) -> tuple[str, str]:
    """The generation prompt for ``question`` after ``history``, and the template's end-of-turn text."""
    from internvl_tune.data.templates import GPT, HUMAN, TEMPLATES, get_template

    if template_name not in TEMPLATES:  # it comes from the checkpoint's config.json, not from a flag
        raise CheckpointError(f"config.json: field 'template' is {template_name!r}, which has no prompt format here — "
                              f"set it to the template the model was trained with: {', '.join(TEMPLATES)}")
    template = get_template(template_name)
    messages = []
    for old_question, old_answer in history:
        messages += [(HUMAN, old_question), (GPT, old_answer)]
    messages.append((HUMAN, question))
    return template.generation_prompt(messages, system_message), template.sep


class ImageProcessor:
    """PIL images -> ``pixel_values`` [tiles, 3, S, S] and tiles per image, with the checkpoint's tiling settings."""

    def __init__(self, image_size: int, dynamic: bool, min_tiles: int, max_tiles: int, use_thumbnail: bool):
        self.image_size, self.dynamic = image_size, dynamic
        self.min_tiles, self.max_tiles, self.use_thumbnail = min_tiles, max_tiles, use_thumbnail

    def __call__(self, images, max_tiles: int | None = None) -> tuple[torch.Tensor, list[int]]:
        from internvl_tune.data.images import build_transform, dynamic_preprocess

        transform = build_transform(False, self.image_size)
        tiles_per_image, pixels = [], []
        for image in images if isinstance(images, (list, tuple)) else [images]:
            image = image.convert("RGB")
            if self.dynamic:
                tiles = dynamic_preprocess(image, self.min_tiles, max_tiles or self.max_tiles, self.image_size,
                                           self.use_thumbnail)
            else:
                tiles = [image]
            pixels += [transform(t) for t in tiles]
            tiles_per_image.append(len(tiles))
        return torch.stack(pixels), tiles_per_image


class InternVLChat:
    """An InternVL2 chat model: ``.model`` is a transformers ``InternVLForConditionalGeneration``.

    Attributes:
        model, tokenizer, image_processor: the parts.
        family: the name of its LLM family (``families.FAMILIES``: ``qwen2``, ``internlm2``, ``phi3``, ...).
        template: conversation template name; ``system_message``: its system text (None = template default).
        num_image_token: tokens per image tile; ``image_size``, ``patch_size``: tile and ViT patch sides.
        img_context_token_id: id of ``<IMG_CONTEXT>``.
        select_layer, ps_version, downsample_ratio: image feature settings.
        original_config: the InternVLChatConfig dict (source of truth for saving in the original layout).
        layout: the source checkpoint's layout, ``original`` or ``native``.
        source_dir: the checkpoint directory it was loaded from (its tokenizer files are copied on save).
        mxfp4_dequantized: how many MXFP4 expert tensors of the files were dequantized on load (GPT-OSS).
    """

    def __init__(self, model, tokenizer, original_config: dict, source_dir: Path | None = None, tokens_added: int = 0,
                 img_context_token_id: int | None = None, layout: str = "original"):
        self.model, self.tokenizer = model, tokenizer
        self.original_config, self.source_dir, self.tokens_added = original_config, source_dir, tokens_added
        self.layout = layout  # the source checkpoint's layout: what a training run exports
        self.family = cfg.family_of(original_config).name
        self.template = cfg.chat_setting(original_config, "template")
        self.system_message = original_config.get("system_message")
        self.select_layer = cfg.chat_setting(original_config, "select_layer")
        self.ps_version = cfg.chat_setting(original_config, "ps_version")
        self.downsample_ratio = cfg.chat_setting(original_config, "downsample_ratio")
        self.image_size = cfg.image_size(original_config)
        self.patch_size = original_config["vision_config"].get("patch_size", 14)
        self.num_image_token = cfg.num_image_token(original_config)
        self.img_context_token_id = (tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) if img_context_token_id is None
                                     else img_context_token_id)
        self.mxfp4_dequantized = 0
        self.image_processor = ImageProcessor(
            self.image_size, cfg.chat_setting(original_config, "dynamic_image_size"),
            cfg.chat_setting(original_config, "min_dynamic_patch"), cfg.chat_setting(original_config, "max_dynamic_patch"),
            cfg.chat_setting(original_config, "use_thumbnail"),
        )

    @property
    def is_moe(self) -> bool:
        """True when the LLM is a mixture of experts (its family has a ``MoeLayout``)."""
        return families.get(self.family).moe is not None

    # ----------------------------------------------------------------------------------------------- features
    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tiles [T, 3, S, S] -> LLM-space features [T, num_image_token, hidden]."""
        inner = self.model.model
        pixel_values = pixel_values.to(device=inner.vision_tower.embeddings.cls_token.device,
                                       dtype=inner.vision_tower.embeddings.cls_token.dtype)
        if self.select_layer == -1:
            hidden = inner.vision_tower(pixel_values=pixel_values).last_hidden_state
        else:
            hidden = inner.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        hidden = hidden[:, 1:, :]  # drop CLS
        side = int(hidden.shape[1] ** 0.5)
        grid = hidden.reshape(hidden.shape[0], side, side, -1)
        grid = inner.pixel_shuffle(grid, scale_factor=self.downsample_ratio)
        if self.ps_version == "v1":
            grid = grid.permute(0, 2, 1, 3)  # v1 never swapped height and width back
        features = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        return inner.multi_modal_projector(features)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_flags: torch.Tensor | None = None, layout: dict | None = None) -> torch.Tensor:
        """Token embeddings with image features written at the ``<IMG_CONTEXT>`` positions.

        Args:
            input_ids: [B, L] token ids.
            pixel_values: [T, 3, S, S] all tiles of the batch in order, or None for text only.
            image_flags: [T] 1 for real tiles, 0 for the dummy tile of a text-only sample (its features are dropped,
                but still computed so that every rank runs the vision tower, as the reference does).
            layout: ``image_layout(...)`` of this batch, computed ahead (the training collator does it on the
                CPU, so the step needs no host sync); computed here when None.

        Returns:
            [B, L, hidden] input embeddings for the LLM.
        """
        embeds = self.model.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        if layout is None:
            if image_flags is None:
                image_flags = torch.ones(pixel_values.shape[0], dtype=torch.long)
            layout = image_layout(input_ids, image_flags.to(input_ids.device), self.img_context_token_id,
                                  self.num_image_token)
        features = self.extract_features(pixel_values)
        features = features.index_select(0, layout["image_tiles"].to(features.device))
        # index_copy (not masked_scatter): its backward is an index_select, with no host sync in the backward pass
        flat = embeds.reshape(-1, embeds.shape[-1])
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return flat.index_copy(0, layout["image_positions"].to(embeds.device), features).view_as(embeds)

    def forward(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, image_flags: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, **llm_kwargs):
        """The reference ``InternVLChatModel.forward``: logits, and the loss when ``labels`` are given.

        Args:
            pixel_values: [T, 3, S, S] every tile of the batch in order (the reference's collator concatenates
                them), or None for text only.
            input_ids: [B, L] prompts with ``<IMG_CONTEXT>`` x ``num_image_token`` per tile.
            attention_mask: [B, L] 1 on tokens, 0 on padding.
            image_flags: [T] or [T, 1]: 0 marks the dummy tile of a text-only sample (its features are dropped).
            labels: [B, L] targets, -100 where no loss is taken; shifted inside, as transformers does.
            position_ids: [B, L], optional.
            llm_kwargs: passed to the language model (``use_cache``, ``output_hidden_states``, ...).

        Returns:
            transformers' ``CausalLMOutputWithPast``: ``loss`` (the mean cross-entropy over the supervised tokens
            of the batch, the reference's ``CrossEntropyLoss()``; None without labels), ``logits`` [B, L, V] and
            what the language model returns besides. Unlike the reference, a prompt whose image tokens do not match
            the tiles is an error, not a loss silently multiplied by 0.
        """
        import torch.nn.functional as F
        from transformers.modeling_outputs import CausalLMOutputWithPast

        device = self.model.lm_head.weight.device
        input_ids = input_ids.to(device)
        if image_flags is not None:
            image_flags = image_flags.reshape(-1)
        embeds = self.embed_inputs(input_ids, pixel_values, image_flags)
        out = self.model(inputs_embeds=embeds, attention_mask=None if attention_mask is None else attention_mask.to(device),
                         position_ids=None if position_ids is None else position_ids.to(device), **llm_kwargs)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    __call__ = forward

    # --------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Generate from a tokenized prompt; returns only the new tokens [B, new]."""
        device = self.model.lm_head.weight.device
        input_ids = input_ids.to(device)
        embeds = self.embed_inputs(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.model.generate(inputs_embeds=embeds, attention_mask=attention_mask.to(device), **generate_kwargs)

    def _prompt_with_images(self, question: str, tiles_per_image: list[int], history) -> tuple[str, str]:
        prompt, sep = build_prompt(self.template, history, question, self.system_message)
        for tiles in tiles_per_image:
            tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (self.num_image_token * tiles) + IMG_END_TOKEN
            prompt = prompt.replace(IMAGE_PLACEHOLDER, tokens, 1)
        return prompt, sep

    def _generation_args(self, sep: str, overrides: dict) -> dict:
        args = {"max_new_tokens": 512, "do_sample": False, **overrides}
        # As the reference: generation stops at the template's separator token (e.g. <|im_end|>, <|end|>).
        args["eos_token_id"] = self.tokenizer.convert_tokens_to_ids(sep.strip())
        args.setdefault("pad_token_id", self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                        else args["eos_token_id"])
        return args

    def _pixels(self, images, pixel_values, tiles_per_image):
        if images is not None:
            return self.image_processor(images)
        if pixel_values is not None and tiles_per_image is None:
            tiles_per_image = [pixel_values.shape[0]]
        return pixel_values, tiles_per_image or []

    def chat(self, images=None, question: str = "", history: list[tuple[str, str]] | None = None,
             pixel_values: torch.Tensor | None = None, tiles_per_image: list[int] | None = None,
             return_history: bool = False, **generation_config):
        """Answer ``question`` about ``images`` (PIL images, or preprocessed ``pixel_values``), as the reference chat.

        ``<image>`` placeholders in the question mark where each image goes; without any, one ``<image>\\n`` is put
        in front on the first turn. Generation is greedy unless ``do_sample=True`` is passed.
        """
        pixel_values, tiles_per_image = self._pixels(images, pixel_values, tiles_per_image)
        history = list(history or [])
        if not history and pixel_values is not None and IMAGE_PLACEHOLDER not in question:
            question = (IMAGE_PLACEHOLDER + "\n") * len(tiles_per_image) + question
        if question.count(IMAGE_PLACEHOLDER) != len(tiles_per_image):
            raise UserError(f"the question has {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders "
                            f"for {len(tiles_per_image)} images — give one per image")
        prompt, sep = self._prompt_with_images(question, tiles_per_image, history)
        inputs = self.tokenizer(prompt, return_tensors="pt")
        out = self.generate(inputs.input_ids, pixel_values, inputs.attention_mask,
                            **self._generation_args(sep, generation_config))
        response = self._answers(out, sep)[0]
        history.append((question, response))
        return (response, history) if return_history else response

    def batch_chat(self, pixel_values: torch.Tensor | None, questions: list[str], tiles_per_image: list[int],
                   **generation_config) -> list[str]:
        """One answer per question; question ``i`` sees ``tiles_per_image[i]`` tiles of ``pixel_values`` (left padding)."""
        queries, sep = [], ""
        for question, tiles in zip(questions, tiles_per_image):
            if pixel_values is not None and IMAGE_PLACEHOLDER not in question:
                question = IMAGE_PLACEHOLDER + "\n" + question
            prompt, sep = self._prompt_with_images(question, [tiles] if pixel_values is not None else [], [])
            queries.append(prompt)
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            inputs = self.tokenizer(queries, return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = side
        out = self.generate(inputs.input_ids, pixel_values, inputs.attention_mask,
                            **self._generation_args(sep, generation_config))
        return self._answers(out, sep)

    def _answers(self, out: torch.Tensor, sep: str) -> list[str]:
        """The generated rows as text up to the stop text, decoded as the reference's chat of the model's series does
        (``Family.answers_keep_special_tokens``; a kept row's padding after its stop token goes with the cut)."""
        skip = not families.get(self.family).answers_keep_special_tokens
        return [r.split(sep.strip())[0].strip() for r in self.tokenizer.batch_decode(out, skip_special_tokens=skip)]

    def set_system_message(self, system_message: str | None) -> None:
        """Use ``system_message`` (None: the template's default) in chat and record it in the config it is saved
        with, so the saved model chats as it was fine-tuned (``--thinking_mode auto``)."""
        self.system_message = system_message
        if system_message is None:
            self.original_config.pop("system_message", None)
        else:
            self.original_config["system_message"] = system_message

    def save_pretrained(self, out_dir, layout: str = "original", overwrite: bool = False, remote_code=None,
                        require_remote_code: bool = False) -> Path:
        """Save weights, config and tokenizer files (``original`` or ``native`` layout); see ``saving.save_chat``."""
        from internvl_tune.models.internvl_chat.saving import save_chat

        return save_chat(self, out_dir, layout, overwrite, remote_code, require_remote_code)


def _resize_for_new_tokens(model, tokenizer, added: int) -> None:
    """Grow the embeddings for newly added tokens; new output rows = mean of the old rows (as reference training)."""
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        out = model.get_output_embeddings().weight
        out[old:] = out[:old].mean(dim=0, keepdim=True)


def load_pretrained(path, dtype: torch.dtype | None = torch.float32, device="cpu", attn_implementation: str = "sdpa",
                    weights: bool = True, load_in_4bit: bool = False, tokenizer=None,
                    img_context_token_id: int | None = None, **overrides) -> InternVLChat:
    """Load an InternVL2 checkpoint in the original or the transformers-native layout, strictly.

    Args:
        path: checkpoint directory (config.json, weights, tokenizer files).
        dtype: parameter dtype; None keeps each tensor's dtype from the files (bit-exact conversion).
        device: where the parameters go.
        attn_implementation: ``sdpa`` or ``eager`` (``flash_attention_2`` where installed).
        weights: False builds the structure only: parameters stay on the meta device (in ``dtype``), buffers are
            real; for ranks that receive their weights from rank 0 (``dist.parallelize.materialize_from_rank0``).
        load_in_4bit: every linear layer of the LLM (not the ViT, projector, embeddings or LM head) holds NF4 weights,
            quantized on ``device`` as they are read and computed in ``dtype`` (``models.common.quantize``; QLoRA).
        tokenizer: for a checkpoint saved without tokenizer files (the reference's training checkpoints): the
            folder holding them (its release's), or a loaded tokenizer; the InternVL tokens are added when missing.
        img_context_token_id: without any tokenizer: the id of ``<IMG_CONTEXT>``; the model then runs ``forward``
            and ``embed_inputs`` on token ids (``chat`` and ``generate`` from text need a tokenizer).
        **overrides: InternVLChatConfig settings to replace (``select_layer``, ``ps_version``, ``template``,
            ``dynamic_image_size``, ``use_thumbnail``, ``min_dynamic_patch``, ``max_dynamic_patch``,
            ``force_image_size``, ``downsample_ratio``, ``drop_path_rate`` of the ViT); None values are ignored.
    """
    path = Path(path)
    layout, original = cfg.read_original_config(path)
    unknown = set(overrides) - set(cfg.CHAT_DEFAULTS) - {"drop_path_rate"}
    if unknown:
        raise UserError(f"load_pretrained got unknown settings: {', '.join(sorted(unknown))}")
    original = copy.deepcopy(original)
    original.update({k: v for k, v in overrides.items() if v is not None and k != "drop_path_rate"})
    if overrides.get("drop_path_rate") is not None:
        original["vision_config"]["drop_path_rate"] = overrides["drop_path_rate"]
    family = cfg.family_of(original, str(path / "config.json"))
    tokenizer = _tokenizer_for(path, family.name, tokenizer, img_context_token_id)
    vocab = original["llm_config"]["vocab_size"]
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) if tokenizer is not None else img_context_token_id
    native = cfg.native_config(original, context_id, attn_implementation)
    if load_in_4bit and weights:
        check_4bit_device(device)  # before reading any weight
    model = build_empty_model(native)
    if family.moe:  # grouped expert products everywhere (training, chat, evaluation), LoRA on experts included
        from internvl_tune.models.common import moe

        model.model.language_model.set_experts_implementation(moe.register())
    if load_in_4bit:
        to_4bit_linears(model.model.language_model, compute_dtype=dtype)
        model.is_loaded_in_4bit = True  # peft then wraps these layers with its 4-bit LoRA layers
    dequantized = 0
    if weights:
        dequantized = load_weights(model, path, layout, LayoutSpec.from_original(original), dtype, device)
    elif dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    model.eval()
    if original["vision_config"].get("drop_path_rate", 0.0) > 0:  # only acts in train mode
        add_drop_path(model.model.vision_tower.encoder.layer, original["vision_config"]["drop_path_rate"])
    added = 0 if tokenizer is None else max(0, len(tokenizer) - vocab)
    if added:
        _resize_for_new_tokens(model, tokenizer, added)
        original = cfg.with_vocab_size(original, len(tokenizer))
    chat = InternVLChat(model, tokenizer, original, source_dir=path, tokens_added=added,
                        img_context_token_id=img_context_token_id if tokenizer is None else None, layout=layout)
    chat.mxfp4_dequantized = dequantized
    return chat


def _tokenizer_for(path: Path, family: str, tokenizer, img_context_token_id: int | None):
    """The checkpoint's own tokenizer, or the one ``load_pretrained`` was given (a folder or an object), or None
    when only ``img_context_token_id`` is."""
    if tokenizer is None and img_context_token_id is not None:
        return None
    if tokenizer is None:
        return load_tokenizer(path, family)
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer, family)
    from internvl_tune.models.internvl_chat.tokenizers import add_internvl_tokens

    add_internvl_tokens(tokenizer)
    return tokenizer
