"""Each answer metric against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import shutil

import pytest

from internvl_tune.eval.chat import metrics as m


def test_normalize_and_exact_match():
    assert m.normalize("  The  Cat.  ") == "the cat"
    assert m.normalize('"Paris!"') == "paris"
    assert m.exact_match("Paris.", ["paris"]) == 1.0
    assert m.exact_match("Paris, France", ["Paris"]) == 0.0
    assert m.exact_match("two", ["2", "Two"]) == 1.0  # the best reference counts
    assert m.exact_match("3.5", ["35"]) == 0.0  # inner punctuation (decimal points) stays


@pytest.mark.parametrize("prediction,references,expected", [
    ("10.4", ["10"], 1.0),    # |10.4 - 10| / 10 = 0.04 <= 0.05
    ("10.6", ["10"], 0.0),    # 0.06 > 0.05
    ("9.5", ["10"], 1.0),     # 0.05 exactly
    ("12%", ["0.12"], 1.0),   # 12 % reads as 0.12
    ("5.", ["5"], 1.0),       # a final full stop does not hide the number
    ("0", ["0"], 1.0),        # a zero reference needs the exact text
    ("0.01", ["0"], 0.0),
    ("Yes", ["yes"], 1.0),    # non-numeric: exact, any case
    ("yes.", ["yes"], 0.0),
    ("7", ["9", "7.2"], 1.0),  # |7 - 7.2| / 7.2 = 0.028 for the second reference
])
def test_relaxed_accuracy(prediction, references, expected):
    assert m.relaxed_accuracy(prediction, references) == expected


def test_levenshtein_and_anls():
    assert m.levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert m.levenshtein("", "abc") == 3
    assert m.anls("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)  # 0.5714: longer string has 7 characters
    assert m.anls("abcd", ["abxy"]) == pytest.approx(0.5)  # 2 edits of 4: exactly at the threshold, kept
    assert m.anls("abcde", ["abxyz"]) == 0.0  # 3 edits of 5: similarity 0.4 < 0.5
    assert m.anls("Hello   World", ["hello world"]) == 1.0  # case and spacing ignored
    assert m.anls("invoice", ["receipt", "invoice no"]) == pytest.approx(1 - 3 / 10)  # best of the two: 0.7


def test_choice_letters():
    question = "Which animal is shown?\nA. dog\nB. cat\nC. bird"
    assert m.options_of(question) == {"A": "dog", "B": "cat", "C": "bird"}
    assert m.choice_letter("B") == "B"
    assert m.choice_letter("(C) a bird") == "C"
    assert m.choice_letter("D. none") == "D"
    assert m.choice_letter("The answer is D.") == "D"
    assert m.choice_letter("Answer: (A)") == "A"
    assert m.choice_letter("A cat on a mat") is None  # the article is not a letter
    assert m.choice_letter("It is a cat", m.options_of(question)) == "B"
    assert m.choice_accuracy("It is a cat", ["B"], question) == 1.0
    assert m.choice_accuracy("A", ["B. cat"], question) == 0.0
    assert m.choice_accuracy("a cat", ["A cat on a mat"], question) is None  # not a multiple-choice reference


def test_score_answer_and_means():
    row = m.score_answer("10.3", ["10"])
    # exact: "10.3" != "10"; relaxed: 0.03 <= 0.05; anls: 2 edits over 4 characters -> 0.5; no letter reference
    assert row == {"exact_match": 0.0, "relaxed_accuracy": 1.0, "anls": 0.5, "choice_accuracy": None}
    rows = [row, m.score_answer("B", ["B"]), m.score_answer("no", ["yes"])]
    means = m.mean_scores(rows, m.ANSWER_METRICS)
    assert means["exact_match"] == pytest.approx(1 / 3)
    assert means["relaxed_accuracy"] == pytest.approx(2 / 3)
    assert means["anls"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # "no" vs "yes": 3 edits of 3 -> 0
    assert means["choice_accuracy"] == 1.0  # only the one letter reference counts


needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java not found: pycocoevalcap's PTB tokenizer "
                                "needs it (apt-get install default-jre-headless)")


@needs_java
def test_bleu4_and_rouge_l_by_hand():
    refs = [["a man rides a red bike"], ["a cat sat on the mat"]]
    preds = ["a man rides a red bike", "a cat sat"]
    groups, per_sample = m.text_scores(refs, preds, {"overall": [0, 1], "second": [1]})
    # corpus BLEU-4: every n-gram of both answers is in its reference (1-4-grams: 9/9, 7/7, 5/5, 3/3), so the
    # precisions are 1; the brevity penalty is exp(1 - 12 / 9) with 12 reference and 9 answer words.
    assert groups["overall"]["bleu4"] == pytest.approx(0.716531, abs=1e-5)
    # ROUGE-L (beta 1.2): "a cat sat" has LCS 3 with a 6-word reference: P = 1, R = 0.5,
    # F = (1 + 1.44) * 1 * 0.5 / (0.5 + 1.44 * 1) = 0.628866; the identical pair scores 1.
    assert per_sample[0]["rouge_l"] == pytest.approx(1.0)
    assert per_sample[1]["rouge_l"] == pytest.approx(0.628866, abs=1e-6)
    assert groups["overall"]["rouge_l"] == pytest.approx((1 + 0.628866) / 2, abs=1e-6)
    assert groups["second"]["rouge_l"] == pytest.approx(0.628866, abs=1e-6)


@needs_java
def test_cider_by_hand():
    # CIDEr-D: an answer equal to its only reference has cosine similarity 1 for every n-gram order and no length
    # penalty: 10 x mean(1, 1, 1, 1) = 10; an answer sharing no word with its reference scores 0.
    groups, per_sample = m.text_scores([["a man rides a red bike"], ["a cat sat on the mat"]],
                                       ["a man rides a red bike", "dog"], {"overall": [0, 1]})
    assert [s["cider"] for s in per_sample] == pytest.approx([10.0, 0.0])
    assert groups["overall"]["cider"] == pytest.approx(5.0)
