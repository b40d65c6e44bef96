"""The LLaMA sentencepiece tokenizer of InternVL-14B, built by transformers from ``tokenizer.model`` (no remote code).

Two uses, as in the reference (the text side lives in ``data/retrieval.py``):

* retrieval text (``add_eos_token=True``): ``'summarize:' + caption``, truncated and padded to 80 tokens with id 0, so
  the model can find the last real token (the EOS) as ``ids > 0``;
* captioning prompts (``add_eos_token=False``): ``'English caption:'`` with BOS only, left-padded when batched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaTokenizer, PreTrainedTokenizerBase

from internvl_tune.data.retrieval import padded_tokens
from internvl_tune.errors import CheckpointError

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


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` for caption prompts (tokenizer loaded with ``add_eos_token=False``)."""
    return padded_tokens(tokenizer, prompts, "left", padding=True)
