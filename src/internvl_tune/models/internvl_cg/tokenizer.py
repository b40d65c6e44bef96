"""The LLaMA sentencepiece tokenizer of InternVL-14B, built by transformers from ``tokenizer.model`` (no remote code).

Two uses, as in the reference:

* retrieval text (``add_eos_token=True``): ``'summarize:' + caption``, truncated and padded to 80 tokens with id 0, so
  the model can find the last real token (the EOS) as ``ids > 0``;
* captioning prompts (``add_eos_token=False``): ``'English caption:'`` with BOS only, left-padded when batched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaTokenizer, PreTrainedTokenizerBase

from internvl_tune.errors import CheckpointError

RETRIEVAL_PREFIX = "summarize:"
RETRIEVAL_MAX_LENGTH = 80
CAPTION_PROMPT = "English caption:"
PAD_ID = 0  # <unk>; the reference pads retrieval text with it and masks with `ids > 0`


def load_tokenizer(path: str | Path, add_eos_token: bool) -> PreTrainedTokenizerBase:
    """Load the tokenizer of an InternVL-14B checkpoint directory.

    Args:
        path: the checkpoint directory (must hold ``tokenizer.model``).
        add_eos_token: True for retrieval text, False for caption prompts.
    """
    path = Path(path)
    if not (path / "tokenizer.model").is_file():
        raise CheckpointError(
            f"{path}: no tokenizer.model — copy the sentencepiece file of InternVL-14B-224px into the checkpoint "
            "directory (fine-tuned checkpoints must carry it too)"
        )
    try:
        tok = LlamaTokenizer.from_pretrained(str(path), add_bos_token=True, add_eos_token=add_eos_token)
    except Exception as exc:  # a corrupt or foreign tokenizer file: say which one
        raise CheckpointError(f"{path / 'tokenizer.model'}: cannot build the LLaMA tokenizer ({exc})") from exc
    tok.pad_token = tok.convert_ids_to_tokens(PAD_ID)
    if tok.pad_token_id != PAD_ID:
        raise CheckpointError(f"{path}: token id 0 is not usable as padding (got pad id {tok.pad_token_id})")
    return tok


def tokenize_retrieval(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    prefix: str = RETRIEVAL_PREFIX,
    max_length: int = RETRIEVAL_MAX_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[N, max_length]`` for ``prefix + text``, right-padded with id 0.

    The tokenizer must have been loaded with ``add_eos_token=True``.
    """
    return _padded(tokenizer, [prefix + t for t in texts], "right", max_length=max_length, truncation=True,
                   padding="max_length")


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` for caption prompts (tokenizer loaded with ``add_eos_token=False``)."""
    return _padded(tokenizer, prompts, "left", padding=True)


def _padded(tokenizer: PreTrainedTokenizerBase, texts: list[str], side: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    # transformers' LLaMA tokenizer defaults to left padding; the reference's slow one padded right. Be explicit.
    saved = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        enc = tokenizer(texts, return_tensors="pt", **kwargs)
    finally:
        tokenizer.padding_side = saved
    return enc["input_ids"], enc["attention_mask"]
