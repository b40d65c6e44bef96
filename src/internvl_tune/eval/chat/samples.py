"""Held-out samples as generation prompts: the conversation up to its last answer, which becomes the reference.

A line of a meta JSON's JSONL (any of the four kinds: text, image, multi-image, video) is read, tiled and tokenized by
the training dataset's own code (``data.dataset.SupervisedDataset``), so a prompt here is exactly what the model saw
in training, up to the assistant header of the last ``gpt`` turn. That turn's text is the reference answer; turns
after it are dropped. Lines in the reference's VQA format (``{"image", "question", "answer"}``, ``answer`` a string or
a list of accepted answers) work too: the question is the human turn, with the benchmark's instruction appended;
so do preference pairs (``question`` / ``chosen`` / ``rejected``: the chosen answer is the reference).

Prompts are never truncated: when a prompt exceeds ``--max_seq_length`` the images get fewer tiles (video: fewer
frames) as in training, and what remains is kept whole (generation has no label to protect).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from internvl_tune.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from internvl_tune.data.dataset import SupervisedDataset, conversation_messages, resolve_path
from internvl_tune.data.meta import sample_kind
from internvl_tune.data.preprocess import check_text
from internvl_tune.data.prompts import with_assistant_header
from internvl_tune.data.templates import GPT, HUMAN
from internvl_tune.errors import DataError

# what a question shows of its images: the placeholders (and the frame lines a video became) are left out
PLACEHOLDERS = re.compile(f"(?:Frame-\\d+: )?(?:{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})\n?")


@dataclass
class Prompt:
    """A tokenized generation prompt; it answers the fitting rules of ``SupervisedDataset`` (length, image end)."""

    input_ids: torch.Tensor
    image_end: int
    references: list[str]
    question: str
    cut_from: int | None = None  # a prompt is never cut


class GenerationDataset(SupervisedDataset):
    """Sample dicts for generation: ``input_ids`` (the prompt), ``pixel_values``, ``image_flags``, ``sample_id``,
    ``references``, ``question``, ``kind``, ``dataset`` and ``media`` (the image or video files, for reports).

    Every line is asked once: ``repeat_time`` above 1 is ignored (a fraction still keeps that share of the lines).

    Args:
        meta_or_specs, tokenizer, cfg, seed: as for ``SupervisedDataset`` (always the evaluation transform).
        instructions: ``{dataset name: text}`` appended to the question of VQA-format lines (a benchmark's
            answer-format instruction, e.g. "Answer the question using a single word or phrase.").
        strict: a broken line stops with its ``file:line`` (``eval chat``); otherwise the next line replaces it
            (``--eval_generate``: a bad validation line must not end a training run).
    """

    def __init__(self, meta_or_specs, tokenizer, cfg, seed: int = 0, instructions: dict[str, str] | None = None,
                 strict: bool = True):
        super().__init__(meta_or_specs, tokenizer, cfg, is_train=False, seed=seed, strict=strict)
        self.sizes = [min(size, len(index)) for size, index in zip(self.sizes, self.indexes)]
        self.starts = np.cumsum([0] + self.sizes)
        self.instructions = instructions or {}
        self._current = ""  # the dataset of the line being prepared (for its instruction)

    def messages(self, item: dict, where: str):
        """The turns up to and including the last ``gpt`` turn (whose text is the reference)."""
        if "conversations" not in item and "question" in item:  # a VQA line, or a preference pair (its chosen answer)
            return None, self._vqa_messages(item, where), []
        system, messages, warnings = conversation_messages(item, self.template, where)
        last = max(k for k, (role, _) in enumerate(messages) if role == GPT)
        return system, messages[: last + 1], warnings

    def _vqa_messages(self, item: dict, where: str) -> list[tuple[str, object]]:
        answer = item.get("answer", item.get("chosen"))
        answers = answer if isinstance(answer, list) else [answer]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise DataError("`answer` must be a string or a list of strings", where,
                            'write "answer": "42" or "answer": ["42", "forty-two"]')
        question = item["question"]
        check_text(question, "`question`", self.template, where)
        instruction = self.instructions.get(self._current)
        return [(HUMAN, f"{question} {instruction}" if instruction else question), (GPT, answers)]

    def prepare(self, i: int):
        k, _ = self.locate(i)
        self._current = self.specs[k].name
        return super().prepare(i)

    def _encode(self, messages, system, counts: list[int], where: str, text_only: bool = False) -> Prompt:
        *history, (_, answer) = messages
        encoded = super()._encode(history, system, counts, where, text_only)
        ids = with_assistant_header(encoded.input_ids, self.tokenizer, self.template)  # the answer follows
        question = history[-1][1] if history and history[-1][0] == HUMAN else ""
        return Prompt(ids, encoded.image_end,
                      list(answer) if isinstance(answer, list) else [answer], question)

    def _finish(self, encoded: Prompt, where: str, notes: list[str]) -> Prompt:
        return encoded  # never cut a prompt: the tiles were already fitted to --max_seq_length where possible

    def _token_fields(self, encoded: Prompt) -> dict:
        return {"input_ids": encoded.input_ids, "references": encoded.references,
                "question": PLACEHOLDERS.sub("", encoded.question).strip()}

    def build(self, i: int) -> dict:
        sample = super().build(i)
        k, line = self.locate(i)
        spec = self.specs[k]
        item = self.indexes[k].read(line)
        kind = sample_kind(item)
        files = item.get("image") if kind in ("image", "multi_image") else item.get("video") if kind == "video" else []
        files = [files] if isinstance(files, str) else files
        media = [resolve_path(spec.root, f, self.cfg.allow_outside_root) for f in files]
        return {**sample, "kind": kind, "dataset": spec.name, "media": media}
