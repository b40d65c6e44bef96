"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap, as its ``COCOEvalCap`` computes them.

We call pycocoevalcap's own PTB tokenizer and scorers in the order ``COCOEvalCap.evaluate`` does, leaving out SPICE
(it downloads Stanford CoreNLP models at first use and breaks on newer Java). The PTB tokenizer and METEOR start
Java subprocesses, so Java must be on PATH.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence

from internvl_tune.errors import DataError, UserError

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
# pycocoevalcap sends all captions to the tokenizer one per line and only replaces "\n"; any other line break
# (Java splits on \r, \u2028, ...) would shift every later caption onto the wrong image. Real captions rarely hold
# them, but random or broken models do; a space changes no token.
LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
JAVA_FIX = "install Java, e.g. `sudo apt-get install default-jre-headless` (Debian/Ubuntu), then run again"


def require_java() -> None:
    """Raise a UserError with the install command when no ``java`` executable is on PATH."""
    if shutil.which("java") is None:
        raise UserError(f"caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR run on it) — {JAVA_FIX}")


def _import_pycocoevalcap():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise UserError("caption metrics need pycocoevalcap — `pip install 'internvl-tune[eval]'`") from None
    return PTBTokenizer, Bleu, Meteor, Rouge, Cider


def _tokenize(tokenizer, captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """PTB-tokenize ``{image_id: [caption, ...]}`` with pycocoevalcap, one caption per line."""
    annotations = {i: [{"caption": LINE_BREAKS.sub(" ", c)} for c in caps] for i, caps in captions.items()}
    try:
        tokenized = tokenizer.tokenize(annotations)
    except FileNotFoundError:  # Popen could not find `java` after all
        raise UserError(f"could not start Java for the PTB tokenizer — {JAVA_FIX}") from None
    except PermissionError as exc:
        # pycocoevalcap writes its temporary input file next to the CoreNLP jar inside the installed package.
        raise UserError(
            f"pycocoevalcap's PTB tokenizer could not write a temporary file next to its jar ({exc.filename}); "
            "install pycocoevalcap into a writable environment (e.g. a virtualenv)"
        ) from None
    if [len(v) for v in tokenized.values()] != [len(v) for v in captions.values()] or list(tokenized) != list(captions):
        raise RuntimeError("the PTB tokenizer returned a different number of lines than captions it was given")
    return tokenized


def score_captions(references: Mapping[int, Sequence[str]], predictions: Mapping[int, str]) -> dict[str, float]:
    """Score one caption per image against its references.

    Args:
        references: ``{image_id: [reference captions]}`` in ground-truth order (see ``datasets.load_references``);
            every image in it is scored, as ``COCOEvalCap`` scores every ground-truth image.
        predictions: ``{image_id: caption}``, exactly one per reference image.

    Returns:
        ``{"Bleu_1": ..., "Bleu_2": ..., "Bleu_3": ..., "Bleu_4": ..., "METEOR": ..., "ROUGE_L": ..., "CIDEr": ...}``
        as Python floats, in that order.
    """
    missing = [i for i in references if i not in predictions]
    extra = [i for i in predictions if i not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} reference image(s) have no prediction (e.g. {missing[:5]})")
        if extra:
            parts.append(f"{len(extra)} prediction(s) name images absent from the references (e.g. {extra[:5]})")
        raise DataError("; ".join(parts), fix="predictions and ground truth must cover the same image ids")
    empty = [i for i, refs in references.items() if not refs]
    if empty:
        raise DataError(f"{len(empty)} image(s) have no reference caption (e.g. {empty[:5]})",
                        fix="every ground-truth image needs at least one annotation")
    # Both sides keyed and ordered like the ground truth, as COCOEvalCap builds them.
    gts, res = tokenize_pairs(references, predictions)
    return score_tokenized(gts, res)[0]


def tokenize_pairs(references: Mapping, predictions: Mapping) -> tuple[dict, dict]:
    """PTB-tokenized ``(references, predictions)`` keyed and ordered like ``references`` (two Java calls).

    Tokenize once, then score any subsets with :func:`score_tokenized` (the scorers themselves are pure Python).
    """
    require_java()
    PTBTokenizer = _import_pycocoevalcap()[0]
    gts = _tokenize(PTBTokenizer(), {i: list(refs) for i, refs in references.items()})
    res = _tokenize(PTBTokenizer(), {i: [predictions[i]] for i in references})
    return gts, res


def score_tokenized(gts: dict, res: dict, names: Sequence[str] = METRIC_NAMES) -> tuple[dict[str, float], dict[str, list[float]]]:
    """pycocoevalcap's scores of tokenized captions, in ``COCOEvalCap``'s order: ``(corpus scores, per-item scores)``.

    Args:
        gts, res: from :func:`tokenize_pairs` (or a subset of both with the same keys).
        names: which of :data:`METRIC_NAMES` to compute (METEOR starts a Java process; the others do not).

    Returns:
        ``{name: corpus score}`` as Python floats, and ``{name: [score of each item, in key order]}``.
    """
    _, Bleu, Meteor, Rouge, Cider = _import_pycocoevalcap()
    corpus: dict[str, float] = {}
    items: dict[str, list[float]] = {}
    if any(n.startswith("Bleu_") for n in names):
        bleu, per_item = Bleu(4).compute_score(gts, res, verbose=0)
        corpus.update(zip(METRIC_NAMES[:4], bleu))
        items.update(zip(METRIC_NAMES[:4], per_item))
    if "METEOR" in names:
        meteor = Meteor()
        try:
            corpus["METEOR"], items["METEOR"] = meteor.compute_score(gts, res)
        finally:
            del meteor  # its __del__ closes the Java process
    if "ROUGE_L" in names:
        corpus["ROUGE_L"], items["ROUGE_L"] = Rouge().compute_score(gts, res)
    if "CIDEr" in names:
        corpus["CIDEr"], items["CIDEr"] = Cider().compute_score(gts, res)
    # ROUGE-L and CIDEr come back as numpy scalars; plain floats print like the reference's summary line.
    return ({n: float(corpus[n]) for n in names}, {n: [float(v) for v in items[n]] for n in names})


def mean_length(captions: Sequence[str]) -> float:
    """Mean number of whitespace-separated words per caption (the third field of the summary line)."""
    if not captions:
        return 0.0
    return sum(len(c.split()) for c in captions) / len(captions)
