"""Conversation -> ``input_ids`` + ``labels``: prompt building, image-token expansion and assistant-only masking.

The prompt is the reference's string. Each ``<image>`` becomes ``<img>`` + ``<IMG_CONTEXT>`` x N + ``</img>``, where
N = 256 x tiles of that image. Labels are ``-100`` everywhere except the assistant answers and the end-of-turn token
after each (``<|im_end|>`` / ``<|end|>``): exactly what the reference's per-template masking yields.

How: the prompt is tokenized piece by piece (one :class:`~internvl_tune.data.templates.Turn` at a time). Pieces meet
before a special token, which tokenizers never merge across, so the ids equal those of the whole string. Inside an
assistant turn the header (``<|im_start|>assistant\\n``) must tokenize to the same ids alone as in the turn; when it
does not (an answer starting with whitespace that merges into the header's newline), the reference's length
bookkeeping goes wrong and it masks the whole sample; we mask the whole sample too and report it (``mismatch``).
Each image is tokenized as a single ``<IMG_CONTEXT>`` and widened afterwards, so long image runs cost nothing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from internvl_tune.constants import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
)
from internvl_tune.data.templates import GPT, HUMAN, SYSTEM, Template
from internvl_tune.errors import DataError

_ONE_IMAGE = IMG_START_TOKEN + IMG_CONTEXT_TOKEN + IMG_END_TOKEN


def image_tokens(n: int) -> str:
    """The text an ``<image>`` placeholder becomes for an image worth ``n`` tokens."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * n + IMG_END_TOKEN


@dataclass
class Encoded:
    """A tokenized sample.

    Attributes:
        input_ids: ``[L]`` token ids.
        labels: ``[L]`` targets, ``-100`` where no loss is taken.
        image_end: index just past the last ``</img>`` (0 without images): truncation must keep it.
        mismatch: a header did not tokenize stably, so every label was masked (the reference does the same).
        cut_from: the length before :meth:`truncated` cut the tail (None: whole).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    image_end: int
    mismatch: bool = False
    cut_from: int | None = None

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def truncated(self, max_len: int) -> "Encoded":
        return Encoded(self.input_ids[:max_len], self.labels[:max_len], self.image_end, self.mismatch,
                       len(self.input_ids))


def check_text(value, field: str, template: Template, where: str | None = None) -> None:
    """A message text must be a non-empty string without the template's or the images' reserved tokens."""
    if not isinstance(value, str):
        raise DataError(f"{field} must be a string, got {type(value).__name__}", where, "write the text as a JSON string")
    if not (value.strip() if template.strip_values else value):
        raise DataError(f"{field} is empty", where, "write the message or remove the turn")
    for special in template.special_texts + (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN):
        if special in value:
            raise DataError(f"{field} contains the reserved token {special}", where,
                            "remove it: the template and the image expansion insert these tokens themselves")


def parse_conversations(conversations, template: Template, where: str | None = None) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """Validate a JSONL ``conversations`` list for ``template``.

    Returns:
        (system message or None, [(role, text)] with role human/gpt, warnings). A leading ``gpt`` turn is dropped,
        as the reference does, with a warning.

    Raises:
        DataError: naming the field and how to fix it.
    """
    if not isinstance(conversations, list) or not conversations:
        raise DataError("`conversations` must be a non-empty list of {\"from\", \"value\"} objects", where,
                        'write e.g. "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]')
    warnings: list[str] = []
    system = None
    messages: list[tuple[str, str]] = []
    for k, turn in enumerate(conversations):
        field = f"conversations[{k}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{field} must be an object with keys \"from\" and \"value\"", where,
                            'write {"from": "human", "value": "..."} (the reference reads "value", not "text")')
        role, value = turn["from"], turn["value"]
        check_text(value, f"{field}.value", template, where)
        if role == SYSTEM:
            if not template.system_turn:
                raise DataError(f"{field}.from is \"system\", which the {template.name} template does not support", where,
                                "remove the system turn, or use --conv_style internvl2_5")
            if k != 0:
                raise DataError(f"{field}.from is \"system\" but a system turn may only come first", where, "move it to the front")
            system = value
            continue
        if role not in (HUMAN, GPT):
            raise DataError(f"{field}.from is {role!r}; expected \"human\" or \"gpt\"", where,
                            'use "human" for the user and "gpt" for the assistant' + (' ("system" may come first)' if template.system_turn else ""))
        messages.append((role, value))
    if template.alternating:
        if messages and messages[0][0] == GPT:
            warnings.append("the first turn is from gpt; it is dropped (as the reference does) — start with the human turn")
            messages = messages[1:]
        for k, (role, _) in enumerate(messages):
            expected = HUMAN if k % 2 == 0 else GPT
            if role != expected:
                raise DataError(f"turn {k + 1} is from {role!r} but turns must alternate human, gpt, human, ...", where,
                                "merge consecutive turns of one speaker or add the missing turn")
    if not any(role == GPT for role, _ in messages):
        raise DataError("no gpt turn, so the sample has nothing to learn from", where, "add the assistant's answer as a gpt turn")
    if messages[-1][0] == HUMAN:
        warnings.append("the last turn is from human; it gets no answer and no loss — add its gpt answer or remove it")
    return system, messages, warnings


class _TokenizerInfo:
    """Per-tokenizer facts used on every sample, computed once."""

    def __init__(self, tokenizer):
        probe = "a"
        with_special = list(tokenizer(probe).input_ids)
        plain = list(tokenizer(probe, add_special_tokens=False).input_ids)
        start = _find(with_special, plain)
        if start < 0:
            raise DataError("the tokenizer gives different ids for a text with and without its special tokens",
                            fix="use the tokenizer that ships with the checkpoint")
        self.prefix = with_special[:start]  # BOS for Llama/InternLM2/Phi-3-style tokenizers, nothing for Qwen2
        self.suffix = with_special[start + len(plain):]
        self.img_context = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        self.img_end = tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)
        for name, tok_id in (("<IMG_CONTEXT>", self.img_context), ("</img>", self.img_end)):
            if tok_id is None or tokenizer.convert_ids_to_tokens(tok_id) != name:
                raise DataError(f"the tokenizer has no {name} token", fix="add the InternVL special tokens "
                                "(internvl_tune.models.internvl_chat.tokenizers.load_tokenizer does)")
        self.cache: dict[str, list[int]] = {}
        self.checked: set[str] = set()

    def encode(self, tokenizer, text: str) -> list[int]:
        # verbose=False: texts longer than the tokenizer's model_max_length are expected (samples are fitted to
        # --max_seq_length afterwards), so transformers' "sequence length is longer" warning would only be noise
        return list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids) if text else []

    def encode_cached(self, tokenizer, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.encode(tokenizer, text)
        return self.cache[text]

    def check_template(self, tokenizer, template: Template) -> None:
        """The template's structural tokens must be single special tokens, or turns would not tokenize apart."""
        if template.name in self.checked:
            return
        for text in template.special_texts:
            if len(self.encode(tokenizer, text)) != 1:
                raise DataError(f"the tokenizer has no special token {text}, which the {template.name} template needs",
                                fix="pick the --conv_style of your model's LLM (InternLM2: internlm2-chat, Qwen2/Yi/Llama-3: "
                                    "Hermes-2, Phi-3: phi3-chat, InternVL2.5 / InternVL3: internvl2_5)")
        self.checked.add(template.name)

    def token_ids(self, tokenizer, tokens: tuple[str, ...]) -> list[int]:
        ids = []
        for t in tokens:
            i = tokenizer.convert_tokens_to_ids(t)
            if i is not None and tokenizer.convert_ids_to_tokens(i) == t:
                ids.append(i)
        return ids


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


_INFO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_info(tokenizer) -> _TokenizerInfo:
    info = _INFO.get(tokenizer)
    if info is None:
        info = _INFO[tokenizer] = _TokenizerInfo(tokenizer)
    return info


def build_conversation_ids(
    messages: list[tuple[str, str]],
    tokenizer,
    template: Template,
    num_image_tokens: list[int],
    system_message: str | None = None,
    text_only: bool = False,
    where: str | None = None,
) -> Encoded:
    """Tokenize one conversation with assistant-only labels.

    Args:
        messages: [(role, text)] from :func:`parse_conversations` (placeholders already prepended/expanded).
        tokenizer: a transformers tokenizer carrying the InternVL special tokens.
        template: the conversation format.
        num_image_tokens: tokens per image, in placeholder order (256 x tiles for InternVL2).
        system_message: overrides the template's system message (a leading ``system`` turn).
        text_only: pure-text sample: ``<image>`` is left as text and nothing is expanded.
        where: ``file:line`` for errors.

    Returns:
        The :class:`Encoded` sample (not truncated).
    """
    info = tokenizer_info(tokenizer)
    info.check_template(tokenizer, template)
    if template.strip_values:  # after any <image>/<video> was prepended, as the reference does
        messages = [(role, text.strip()) for role, text in messages]
    turns = template.turns(messages, system_message)
    # Replace the first len(num_image_tokens) placeholders in prompt order (human turns only for internvl2_5).
    remaining = 0 if text_only else len(num_image_tokens)
    for turn in turns:
        if remaining and turn.role != SYSTEM and (turn.role == HUMAN or not template.images_in_human_only):
            found = min(turn.body.count(IMAGE_PLACEHOLDER), remaining)
            turn.body = turn.body.replace(IMAGE_PLACEHOLDER, _ONE_IMAGE, found)
            remaining -= found
    if remaining:
        raise DataError(
            f"{len(num_image_tokens)} image(s) but only {len(num_image_tokens) - remaining} <image> placeholder(s) in the "
            "conversation", where, "put one <image> in the human turns per image, in the order of the image list")

    header_ids = info.encode_cached(tokenizer, template.roles[1])
    # internvl2_5 ends a turn with "<|im_end|>\n": the reference masks the turn's last token, meant to be the newline
    # (with a tokenizer that drops a lone newline this is <|im_end|> itself; we keep that behaviour).
    n_tail = 1 if template.sep != template.answer_end else 0
    ids: list[int] = list(info.prefix)
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    mismatch = False
    for turn in turns:
        piece = info.encode(tokenizer, turn.text)
        ids += piece
        if turn.role != GPT:
            labels += [IGNORE_INDEX] * len(piece)
            continue
        n_head = len(header_ids)
        if piece[:n_head] != header_ids or len(piece) <= n_head + n_tail:
            mismatch = True
        labels += [IGNORE_INDEX] * n_head + piece[n_head : len(piece) - n_tail] + [IGNORE_INDEX] * n_tail
    ids += info.suffix
    labels += [IGNORE_INDEX] * len(info.suffix)

    input_ids = torch.tensor(ids, dtype=torch.long)
    target = torch.tensor(labels, dtype=torch.long)
    if mismatch:
        target.fill_(IGNORE_INDEX)
    for tok_id in info.token_ids(tokenizer, template.unsupervised_tokens):
        target[input_ids == tok_id] = IGNORE_INDEX
    image_end = 0
    if not text_only and num_image_tokens:
        input_ids, target = _widen_images(input_ids, target, info.img_context, num_image_tokens)
        ends = (input_ids == info.img_end).nonzero()
        image_end = int(ends[-1]) + 1 if len(ends) else 0
    return Encoded(input_ids, target, image_end, mismatch)


def _widen_images(ids: torch.Tensor, labels: torch.Tensor, context_id: int, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat the k-th ``<IMG_CONTEXT>`` token ``counts[k]`` times."""
    repeats = torch.ones_like(ids)
    positions = (ids == context_id).nonzero().flatten()
    if len(positions) != len(counts):
        raise DataError(f"found {len(positions)} image slots for {len(counts)} images",
                        fix="do not write <IMG_CONTEXT> in the text")
    repeats[positions] = torch.tensor(counts, dtype=torch.long)
    return ids.repeat_interleave(repeats), labels.repeat_interleave(repeats)
