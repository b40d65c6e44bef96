"""Preference data for DPO / MPO: the reference's MMPR lines -> (chosen, rejected) pairs that share their images.

A line (``internvl_chat_mpo.py`` reads the same fields)::

    {"image": "a.jpg", "question": "<image>\\nHow many ...?", "chosen": "... Final answer: 3", "rejected": "... 4"}

``image`` may be a path, a list of paths (one ``<image>`` per image in ``question``) or absent (pure text);
``video`` a clip, as for supervised lines (``data/dataset.py``); a missing ``<image>`` / ``<video>`` is prepended.
The meta JSON is the same as for supervised fine-tuning. Each answer becomes one token row, the human turn
``question`` followed by the gpt turn; the two rows are fitted to ``--max_seq_length`` with the *same* tiles (the
longer one decides), so the collator can compute one set of image features per pair and show it to both rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from internvl_tune.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from internvl_tune.data.batching import ChatBatch, ChatCollator
from internvl_tune.data.dataset import SupervisedDataset
from internvl_tune.data.preprocess import Encoded, check_text
from internvl_tune.data.templates import GPT, HUMAN, Template
from internvl_tune.errors import DataError

FIELDS = ("question", "chosen", "rejected")
SIDES = ("chosen", "rejected")


def preference_fields(item: dict, template: Template, where: str | None = None) -> tuple[str, str, str]:
    """``(question, chosen, rejected)`` of a preference line, validated; a DataError names the field and the fix."""
    for name in FIELDS:
        if name not in item:
            sft = " (this line has `conversations`: a supervised line, trained with --objective sft)" \
                if "conversations" in item else ""
            raise DataError(f"`{name}` is missing{sft}", where,
                            'a preference line holds "question", "chosen" and "rejected" strings')
        check_text(item[name], f"`{name}`", template, where)
    for name in SIDES:
        if IMAGE_PLACEHOLDER in item[name] or VIDEO_PLACEHOLDER in item[name]:
            raise DataError(f"`{name}` contains <image> or <video>", where,
                            "placeholders belong in `question` only")
    return item["question"], item["chosen"], item["rejected"]


def preference_texts(item: dict) -> list[str]:
    """The texts of a line's two rows, for the length estimates (``data/lengths.py``)."""
    texts = [item.get(name) for name in ("question", "chosen", "question", "rejected")]
    if not all(isinstance(t, str) for t in texts):
        raise DataError("not a preference line")
    return texts


@dataclass
class PairEncoded:
    """The two tokenized rows of a pair. It answers the fitting rules of ``SupervisedDataset`` (length, image end,
    truncation, supervised tokens) for both rows at once: the longer row decides, the shorter one follows."""

    chosen: Encoded
    rejected: Encoded

    @property
    def rows(self) -> tuple[Encoded, Encoded]:
        return self.chosen, self.rejected

    @property
    def input_ids(self) -> torch.Tensor:
        return max(self.chosen.input_ids, self.rejected.input_ids, key=len)

    @property
    def labels(self) -> torch.Tensor:
        return max(self.rows, key=lambda e: len(e.input_ids)).labels

    @property
    def image_end(self) -> int:
        return self.chosen.image_end  # the same prompt precedes both answers

    @property
    def mismatch(self) -> bool:
        return self.chosen.mismatch or self.rejected.mismatch

    @property
    def num_supervised(self) -> int:
        """The fewer of the two rows' supervised tokens: each answer needs one."""
        return min(e.num_supervised for e in self.rows)

    @property
    def cut_from(self) -> int | None:
        """The longer row's length before truncation (None: neither was cut)."""
        return max((e.cut_from for e in self.rows if e.cut_from is not None), default=None)

    def truncated(self, max_len: int) -> PairEncoded:
        return PairEncoded(self.chosen.truncated(max_len), self.rejected.truncated(max_len))


class PreferenceDataset(SupervisedDataset):
    """Preference lines of a meta JSON -> sample dicts with ``chosen_input_ids`` / ``chosen_labels``,
    ``rejected_input_ids`` / ``rejected_labels`` and, once per pair, ``pixel_values`` / ``image_flags``.

    Tiling, video frames, placeholders, fitting and augmentation are those of :class:`SupervisedDataset`: the human
    turn carries both answers through its builders, and :meth:`_encode` tokenizes one row per answer.
    """

    rows_per_sample = 2
    line_texts = staticmethod(preference_texts)

    def messages(self, item: dict, where: str):
        question, chosen, rejected = preference_fields(item, self.template, where)
        same = ["`chosen` and `rejected` are the same text, so the pair teaches no preference"] if chosen == rejected else []
        return None, [(HUMAN, question), (GPT, (chosen, rejected))], same

    def _encode(self, messages, system, counts: list[int], where: str, text_only: bool = False) -> PairEncoded:
        *prompt, (role, answers) = messages
        return PairEncoded(*(super(PreferenceDataset, self)._encode(prompt + [(role, answer)], system, counts, where,
                                                                     text_only) for answer in answers))

    def _token_fields(self, encoded: PairEncoded) -> dict:
        return {f"{side}_{key}": getattr(row, key) for side, row in zip(SIDES, encoded.rows)
                for key in ("input_ids", "labels")}


@dataclass
class PreferenceBatch(ChatBatch):
    """A micro-batch of ``pairs`` pairs: token rows (padded, or segments of one packed row) chosen 0, rejected 0,
    chosen 1, ... (``loss_sample`` is the row: ``2 x pair + side``); ``pixel_values`` holds each pair's tiles once
    and ``image_tiles`` repeats them for its two rows. ``weight`` is the number of pairs."""

    pairs: int = 0
    chosen_tokens: torch.Tensor | None = None  # [pairs] supervised tokens of each chosen answer


@dataclass(frozen=True)
class PreferenceCollator(ChatCollator):
    """``collate_fn`` of preference training: pairs -> :class:`PreferenceBatch` (``loss_reduction`` is unused)."""

    def __call__(self, samples: list[dict]) -> PreferenceBatch:
        rows = [{"input_ids": s[f"{side}_input_ids"], "labels": s[f"{side}_labels"]} for s in samples for side in SIDES]
        fields = self.fields(rows, samples, [i // 2 for i in range(len(rows))])
        tokens = torch.bincount(fields["loss_sample"], minlength=len(rows))
        return PreferenceBatch(**fields, weight=float(len(samples)), pairs=len(samples), chosen_tokens=tokens[0::2])
