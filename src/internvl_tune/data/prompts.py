"""Prompt lines for online RL (GRPO / GSPO): the meta JSON + JSONL format of supervised data, read up to the question.

A line is a supervised line whose conversation ends with the human turn to answer, or with a gpt turn that is the
reference answer (dropped from the prompt, given to the rewards as ``answer``)::

    {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nHow many cats?"}], "answer": "3"}
    {"conversations": [{"from": "human", "value": "2 + 3 = ?"}, {"from": "gpt", "value": "5"}]}

Text, single-image, multi-image and video lines, placeholders, tiling and frames are those of
:class:`~internvl_tune.data.dataset.SupervisedDataset`. Every other field of the line (``answer``, ``solution``,
``boxes``, ...) reaches the reward functions. A prompt is tokenized as ``InternVLChat.chat`` prompts: the turns, then
the assistant header; it must leave ``completion_tokens`` of ``--max_seq_length`` for the answer, and is never cut
(tiles shrink first, then the line is refused).

:class:`PromptCollator` left-pads a micro-batch of prompts for generation; the rollout (``models/internvl_chat/
objectives/grpo.py``) turns each prompt and its completions into training rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from internvl_tune.constants import IGNORE_INDEX
from internvl_tune.data.batching import TensorBatch, image_layout
from internvl_tune.data.dataset import SupervisedDataset
from internvl_tune.data.preprocess import Encoded, parse_conversations, tokenizer_info
from internvl_tune.data.templates import GPT, HUMAN
from internvl_tune.errors import DataError

PLACEHOLDER_ANSWER = "(the answer)"  # stands for the missing gpt turn while a prompt's turns are validated


def prompt_turns(item: dict, template, where: str | None = None) -> tuple[str | None, list[tuple[str, str]], str | None,
                                                                         list[str]]:
    """``(system message, turns ending with a human turn, reference answer or None, warnings)`` of a prompt line."""
    conversations = item.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        extra = " (this line has `chosen`: a preference line, trained with --objective dpo or mpo)" \
            if "chosen" in item else ""
        raise DataError(f"`conversations` must be a non-empty list of turns{extra}", where,
                        'write "conversations": [{"from": "human", "value": "<image>\\nQuestion?"}]')
    reference = None
    last = conversations[-1]
    if isinstance(last, dict) and last.get("from") == GPT:
        reference, conversations = last.get("value"), conversations[:-1]
    if not any(isinstance(t, dict) and t.get("from") == HUMAN for t in conversations):
        raise DataError("a prompt line needs a human turn: the question to answer", where,
                        'write "conversations": [{"from": "human", "value": "Question?"}] (a last gpt turn is the '
                        "reference answer)")
    # the shared parser validates roles, order and reserved tokens; it wants an answer, so one stands in for it
    system, messages, warnings = parse_conversations(conversations + [{"from": GPT, "value": PLACEHOLDER_ANSWER}],
                                                     template, where)
    messages = messages[:-1]
    if not messages or messages[-1][0] != HUMAN:
        raise DataError("a prompt line must end with the human turn to answer (optionally followed by one gpt turn, "
                        "the reference answer)", where, "drop the trailing turns after the question")
    return system, messages, reference, warnings


def prompt_texts(item: dict) -> list[str]:
    """The texts of a prompt line without its reference answer, for the length estimates (``data/lengths.py``)."""
    turns = item.get("conversations")
    if not isinstance(turns, list):
        raise DataError("no conversations")
    if turns and isinstance(turns[-1], dict) and turns[-1].get("from") == GPT:
        turns = turns[:-1]
    return [t.get("value", "") for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]


def with_assistant_header(input_ids: torch.Tensor, tokenizer, template) -> torch.Tensor:
    """A tokenized conversation as a generation prompt: without the tokenizer's end-of-text suffix (if it adds one),
    then the assistant header, which the answer follows (as ``Template.generation_prompt`` writes it)."""
    info = tokenizer_info(tokenizer)
    ids = input_ids[: len(input_ids) - len(info.suffix)]
    header = torch.tensor(info.encode_cached(tokenizer, template.roles[1]), dtype=torch.long)
    return torch.cat([ids, header])


def reward_fields(item: dict, reference: str | None) -> dict:
    """What the rewards see of a line: every field but ``conversations``; ``answer`` defaults to the gpt turn."""
    fields = {k: v for k, v in item.items() if k != "conversations"}
    if reference is not None and "answer" not in fields:
        fields["answer"] = reference
    return fields


class PromptDataset(SupervisedDataset):
    """Prompt lines of a meta JSON -> sample dicts with ``input_ids`` (the prompt, ending with the assistant header),
    ``labels`` (all ignored), ``pixel_values`` / ``image_flags``, and for the rollout ``index`` (the sample's position
    in the dataset: its completions' random streams derive from it), ``where`` (``file:line``), ``prompt`` (the
    question's text) and ``fields``.

    Args:
        completion_tokens: tokens of ``max_seq_length`` kept free for the completion (``--max_completion_length``).
        The others as for :class:`SupervisedDataset`.
    """

    line_texts = staticmethod(prompt_texts)
    truncates = False  # a prompt that does not fit is refused (:meth:`_finish`)

    def __init__(self, meta_or_specs, tokenizer, cfg, is_train: bool = True, seed: int = 0, strict: bool = False,
                 completion_tokens: int = 0):
        if completion_tokens >= cfg.max_seq_length:
            raise DataError(f"--max_completion_length {completion_tokens} leaves no room for a prompt in "
                            f"--max_seq_length {cfg.max_seq_length}", fix="raise --max_seq_length")
        # the base class fits samples (tiles, frames) into max_seq_length: here the prompt's share of it
        super().__init__(meta_or_specs, tokenizer, dataclasses.replace(cfg, max_seq_length=cfg.max_seq_length -
                                                                       completion_tokens), is_train, seed, strict)
        self.completion_tokens = completion_tokens

    def messages(self, item: dict, where: str):
        """The system message, the prompt's turns (without its reference answer) and warnings (``parse`` and
        ``data check`` apply the shared rules to them)."""
        system, messages, _, warnings = prompt_turns(item, self.template, where)
        return system, messages, warnings

    def _encode(self, messages, system, counts: list[int], where: str, text_only: bool = False) -> Encoded:
        """The conversation's tokens, then the assistant header (what generation continues from)."""
        enc = super()._encode(messages, system, counts, where, text_only)
        ids = with_assistant_header(enc.input_ids, self.tokenizer, self.template)
        return Encoded(ids, torch.full_like(ids, IGNORE_INDEX), enc.image_end, enc.mismatch)

    def _finish(self, enc: Encoded, where: str, notes: list[str]) -> Encoded:
        """A prompt is never cut: one that does not fit (after fewer tiles) is refused."""
        limit = self.cfg.max_seq_length
        if len(enc.input_ids) > limit:
            raise DataError(f"the prompt has {len(enc.input_ids)} tokens, more than the {limit} that --max_seq_length "
                            f"{limit + self.completion_tokens} leaves beside --max_completion_length "
                            f"{self.completion_tokens}", where,
                            "raise --max_seq_length, lower --max_completion_length or the tile/frame count, or "
                            "shorten the prompt")
        return enc

    def build(self, i: int) -> dict:
        sample = super().build(i)
        k, line = self.locate(i)
        item = self.indexes[k].read(line)
        _, messages, reference, _ = prompt_turns(item, self.template)
        return {**sample, "index": i, "where": self.where(i), "prompt": messages[-1][1],
                "fields": reward_fields(item, reference)}


@dataclass
class PromptBatch(TensorBatch):
    """A micro-batch of prompts for generation: ``input_ids`` / ``attention_mask`` [P, L] left-padded, every tile of
    the batch (``pixel_values``, ``image_flags``) and where their features go (``image_tiles``, ``image_positions``),
    plus what the rollout keeps per prompt: its sample dict (unpadded ids, its own tiles), dataset index, text and
    fields. ``weight`` / ``work`` count prompts (the rollout's training batches count tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_flags: torch.Tensor
    image_tiles: torch.Tensor
    image_positions: torch.Tensor
    samples: list[dict]
    sample_ids: list[str]
    weight: float = 0.0

    @property
    def work(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class PromptCollator:
    """``collate_fn`` of prompt lines: left padding (generation appends on the right)."""

    pad_token_id: int
    img_context_token_id: int
    num_image_token: int

    def __call__(self, samples: list[dict]) -> PromptBatch:
        longest = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[row, longest - n:] = s["input_ids"]
            mask[row, longest - n:] = 1
        flags = torch.cat([s["image_flags"] for s in samples])
        layout = image_layout(input_ids, flags, self.img_context_token_id, self.num_image_token)
        return PromptBatch(input_ids=input_ids, attention_mask=mask,
                           pixel_values=torch.cat([s["pixel_values"] for s in samples]), image_flags=flags,
                           **layout, samples=samples, sample_ids=[s["sample_id"] for s in samples],
                           weight=float(len(samples)))
