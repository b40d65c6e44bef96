"""How a generated answer is scored against the reference answer(s) of a held-out sample.

Per sample (each a number in [0, 1]; the best over several references):

* ``exact_match``: equal after :func:`normalize` (case, surrounding space and quotes, a final full stop).
* ``relaxed_accuracy``: ChartQA's relaxed accuracy: a number within 5 % of a non-zero numeric reference counts
  (``12%`` reads as 0.12); anything else must match exactly, ignoring case.
* ``anls``: 1 - normalised Levenshtein distance (DocVQA / InfographicVQA), set to 0 below the threshold 0.5.
* ``choice_accuracy``: multiple choice: the option letter the answer gives (``B``, ``(B)``, ``B. a cat``, ``The
  answer is B``, or an option's text when the question lists ``A. ...`` lines) equals the reference's letter.
  Only samples whose reference is a letter count (``None`` elsewhere).

Corpus metrics over a group of samples: BLEU-4, ROUGE-L and CIDEr through pycocoevalcap's PTB tokenizer and scorers,
as the caption evaluation computes them (``eval/caption/metrics.py``; needs Java).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

ANSWER_METRICS = ("exact_match", "relaxed_accuracy", "anls", "choice_accuracy")
TEXT_METRICS = {"bleu4": "Bleu_4", "rouge_l": "ROUGE_L", "cider": "CIDEr"}  # ours -> pycocoevalcap's name
ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05

_SPACE = re.compile(r"\s+")
_QUOTES = "\"'`“”‘’"
# "B", "(B)", "B.", "B)", "B: ..." -- but not the article of "A cat on a mat"
_LEADING_LETTER = re.compile(r"^(?:\(([A-Z])\)|([A-Z])(?:$|[.:)]))")
_STATED_LETTER = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*[:：]?\s*\(?([A-Z])\)?(?![A-Za-z])")
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.+?)\s*$", re.MULTILINE)


def normalize(text: str) -> str:
    """Lower case, one space between words, no surrounding quotes or space, no final ``.``, ``!`` or ``?``."""
    text = _SPACE.sub(" ", text.lower()).strip()
    text = text.strip(_QUOTES).strip()
    return text.rstrip(".!?。！？").strip()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference."""
    answer = normalize(prediction)
    return float(any(answer == normalize(r) for r in references))


def _number(text: str) -> float | None:
    text = text.strip().rstrip(".")
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: Sequence[str], tolerance: float = RELAXED_TOLERANCE) -> float:
    """ChartQA's relaxed accuracy: numbers within ``tolerance`` of a non-zero reference, else exact (any case).

    The relative error is taken against the reference, as the ChartQA paper defines it (the InternVL reference
    script divides by the prediction instead).
    """
    value = _number(prediction)
    for reference in references:
        target = _number(reference)
        if value is not None and target:  # a zero or non-numeric reference needs the exact answer
            if abs(value - target) / abs(target) <= tolerance:
                return 1.0
        elif prediction.strip().lower() == reference.strip().lower():
            return 1.0
    return 0.0


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) > len(b):
        a, b = b, a
    row = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        previous, row[0] = row[0], j
        for i, ca in enumerate(a, 1):
            previous, row[i] = row[i], min(row[i] + 1, row[i - 1] + 1, previous + (ca != cb))
    return row[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one answer: ``1 - distance / longer length`` for the closest
    reference, case and spacing ignored; 0 when below ``threshold`` (as the DocVQA evaluation script)."""
    answer = " ".join(prediction.strip().lower().split())
    best = 0.0
    for reference in references:
        target = " ".join(reference.strip().lower().split())
        longest = max(len(answer), len(target))
        best = max(best, 1.0 - (levenshtein(answer, target) / longest if longest else 0.0))
    return best if best >= threshold else 0.0


def options_of(question: str) -> dict[str, str]:
    """The ``A. text`` / ``(B) text`` option lines of a multiple-choice question: ``{"A": "text", ...}``."""
    return {letter: text for letter, text in _OPTION_LINE.findall(question)}


def choice_letter(text: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter an answer gives, or None.

    In order: a leading capital letter (``B``, ``(B)``, ``B.``, ``B) ...``, ``B: ...``); a stated one (``The answer
    is B``, ``Answer: (C)``); the one option of ``options`` whose text the answer contains (compared normalised).
    """
    text = text.strip()
    match = _LEADING_LETTER.match(text) or _STATED_LETTER.search(text)
    if match:
        return next(g for g in match.groups() if g)
    if options:
        answer = normalize(text)
        found = [letter for letter, option in options.items() if normalize(option) and normalize(option) in answer]
        if len(found) == 1:
            return found[0]
    return None


def choice_accuracy(prediction: str, references: Sequence[str], question: str = "") -> float | None:
    """1.0 / 0.0 when a reference is an option letter (``B``, ``(B)``, ``B. cat``), else None (not multiple choice)."""
    letters = {choice_letter(r) for r in references} - {None}
    if not letters:
        return None
    return float(choice_letter(prediction, options_of(question)) in letters)


def score_answer(prediction: str, references: Sequence[str], question: str = "") -> dict[str, float | None]:
    """The per-sample metrics of :data:`ANSWER_METRICS` for one prediction."""
    return {
        "exact_match": exact_match(prediction, references),
        "relaxed_accuracy": relaxed_accuracy(prediction, references),
        "anls": anls(prediction, references),
        "choice_accuracy": choice_accuracy(prediction, references, question),
    }


def mean_scores(rows: Sequence[dict[str, float | None]], names: Sequence[str]) -> dict[str, float | None]:
    """The mean of each metric over the rows where it applies (None when it applies to none)."""
    out: dict[str, float | None] = {}
    for name in names:
        values = [r[name] for r in rows if r.get(name) is not None]
        out[name] = sum(values) / len(values) if values else None
    return out


def text_scores(references: Sequence[Sequence[str]], predictions: Sequence[str],
                groups: dict[str, list[int]]) -> tuple[dict[str, dict[str, float]], list[dict[str, float]]]:
    """BLEU-4, ROUGE-L and CIDEr of each group of samples (corpus scores, e.g. per dataset and ``overall``) and of
    each sample (its scores within the whole set), through pycocoevalcap; every caption is tokenized once.

    Args:
        references: per sample, its reference answers.
        predictions: per sample, the generated answer.
        groups: ``{group name: sample indices}``.
    """
    from internvl_tune.eval.caption.metrics import score_tokenized, tokenize_pairs

    gts, res = tokenize_pairs(dict(enumerate(references)), dict(enumerate(predictions)))
    names = list(TEXT_METRICS.values())
    by_group = {}
    for group, indices in groups.items():
        if indices:
            corpus, _ = score_tokenized({i: gts[i] for i in indices}, {i: res[i] for i in indices}, names)
            by_group[group] = {ours: corpus[theirs] for ours, theirs in TEXT_METRICS.items()}
    _, items = score_tokenized(gts, res, names)
    per_sample = [{ours: items[theirs][i] for ours, theirs in TEXT_METRICS.items()} for i in range(len(predictions))]
    return by_group, per_sample
