"""Prompt building and assistant-only label masks for every template, kind and tokenizer family.

Expectations are of three sorts: literal prompt strings written by hand; the mask rule applied by hand (ids equal the
tokenization of the whole prompt; labels are exactly each answer + its end token); and (length, supervised-token)
counts taken from running the reference's own preprocess functions beside ours on these conversations (all equal,
see REFERENCE below).
"""

from __future__ import annotations

import pytest

from internvl_tune.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from internvl_tune.data import build_conversation_ids, get_template, parse_conversations
from internvl_tune.data.preprocess import image_tokens
from internvl_tune.data.templates import SYSTEM_INTERNVL2, SYSTEM_INTERNVL2_5
from internvl_tune.errors import DataError


def conv(*turns, system=None):
    out = [{"from": "system", "value": system}] if system else []
    return out + [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


CASES = {
    "text": (conv("What is the capital of France?", "The capital of France is Paris."), []),
    "multi_turn": (conv("Give me two tips.", "Hold it steady.", "And at night?", "Use a tripod and keep the ISO low.",
                        "Thanks", "You are welcome!"), []),
    "image": (conv("<image>\nDescribe this image.", "A cat with green eyes."), [256 * 7]),
    "multi_image": (conv("<image>\n<image>\nCompare them.", "The first is a cat, the second a cup.", "<image>\nAnd this?",
                         "A rocket."), [256 * 2, 256 * 3, 256]),
    "video": (conv("Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nWhat happens?", "The camera pans across a pagoda."),
              [256] * 3),
    "grounding": (conv("<image>\nWhere is the helmet?", "<ref>the helmet</ref><box>[[566, 680, 1000, 1000]]</box>"), [256 * 5]),
}

# (template, tokenizer, case) -> (tokens, supervised tokens) produced by the reference's preprocess_internlm /
# preprocess_mpt / preprocess_phi3 / preprocess_internvl2_5 on the same conversations and tokenizers (our output
# matched them id for id). None: the reference reports "tokenization mismatch" and masks everything, because its
# per-piece length bookkeeping assumes a tokenizer detail these tokenizers lack (Phi-3's fast tokenizer inserting a
# prefix-space token before a leading special token; no BOS for Yi); we supervise the answers as in single turns.
REFERENCE = {
    ("internlm2-chat", "internlm2", "text"): (215, 22),
    ("internlm2-chat", "internlm2", "multi_turn"): (291, 57),
    ("internlm2-chat", "internlm2", "image"): (1998, 18),
    ("internlm2-chat", "internlm2", "multi_image"): (1779, 33),
    ("internlm2-chat", "internlm2", "video"): (1008, 21),
    ("internlm2-chat", "internlm2", "grounding"): (1504, 36),
    ("Hermes-2", "qwen2", "text"): (60, 8),
    ("Hermes-2", "qwen2", "multi_turn"): (89, 20),
    ("Hermes-2", "qwen2", "image"): (1851, 7),
    ("Hermes-2", "qwen2", "multi_image"): (1619, 16),
    ("Hermes-2", "qwen2", "video"): (849, 9),
    ("Hermes-2", "qwen2", "grounding"): (1362, 29),
    ("Hermes-2", "yi", "text"): (217, 22),
    ("Hermes-2", "yi", "image"): (2002, 17),
    ("Hermes-2", "yi", "multi_turn"): None,
    ("phi3-chat", "phi3", "text"): (200, 22),
    ("phi3-chat", "phi3", "image"): (1984, 17),
    ("phi3-chat", "phi3", "video"): (998, 22),
    ("phi3-chat", "phi3", "grounding"): (1491, 37),
    ("phi3-chat", "phi3", "multi_turn"): None,
    ("internvl2_5", "qwen2", "text"): (61, 8),
    ("internvl2_5", "qwen2", "multi_turn"): (94, 20),
    ("internvl2_5", "qwen2", "image"): (1852, 7),
    ("internvl2_5", "qwen2", "multi_image"): (1622, 16),
    ("internvl2_5", "qwen2", "video"): (850, 9),
    ("internvl2_5", "internlm2", "text"): (215, 21),
    ("internvl2_5", "internlm2", "multi_turn"): (291, 54),
    ("internvl2_5", "internlm2", "image"): (1998, 17),
}


def encode(template_name, tokenizer, case):
    turns, counts = CASES[case]
    template = get_template(template_name)
    system, messages, _ = parse_conversations(turns, template)
    return build_conversation_ids(messages, tokenizer, template, counts, system, text_only=not counts)


def expected_prompt(template_name, case):
    """The reference prompt string, built by hand from the template's literal strings."""
    turns, counts = CASES[case]
    t = get_template(template_name)
    text = t.system_template.format(system_message=t.system_message) + t.sep
    for turn in turns:
        value = turn["value"].strip() if t.strip_values else turn["value"]
        text += (t.roles[0] if turn["from"] == "human" else t.roles[1]) + value + t.sep
    for n in counts:
        text = text.replace("<image>", image_tokens(n), 1)
    return text


def test_prompt_strings_are_the_reference_formats():
    msgs = [("human", "Hi"), ("gpt", "Hello")]
    assert get_template("internlm2-chat").prompt(msgs) == (
        f"<|im_start|>system\n{SYSTEM_INTERNVL2}<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello<|im_end|>")
    assert get_template("Hermes-2").prompt(msgs) == get_template("internlm2-chat").prompt(msgs)
    assert get_template("phi3-chat").prompt(msgs) == (
        f"<|system|>\n{SYSTEM_INTERNVL2}<|end|><|user|>\nHi<|end|><|assistant|>\nHello<|end|>")
    assert get_template("internvl2_5").prompt(msgs) == (
        f"<|im_start|>system\n{SYSTEM_INTERNVL2_5}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n")
    assert get_template("internvl2_5").prompt(msgs, "Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert get_template("plain").prompt(msgs) == "Hi\nHello\n"
    assert get_template("Hermes-2").generation_prompt([("human", "Hi")]).endswith("<|im_end|><|im_start|>assistant\n")


@pytest.mark.parametrize("key", sorted(REFERENCE, key=str))
def test_matches_reference_counts(tokenizers, key):
    template, style, case = key
    enc = encode(template, tokenizers[style], case)
    assert not enc.mismatch
    if REFERENCE[key] is not None:
        assert (len(enc.input_ids), enc.num_supervised) == REFERENCE[key]


@pytest.mark.parametrize("template", ["internlm2-chat", "Hermes-2", "phi3-chat"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_and_labels_by_hand(tokenizers, template, case):
    """ids = tokenizer(whole prompt); labels = exactly the tokens of each answer + its end token."""
    tok = tokenizers[{"internlm2-chat": "internlm2", "Hermes-2": "qwen2", "phi3-chat": "phi3"}[template]]
    t = get_template(template)
    enc = encode(template, tok, case)
    prompt = expected_prompt(template, case)
    assert enc.input_ids.tolist() == tok(prompt).input_ids
    # Independent rule: the tokens between tokenize(prompt up to the end of an assistant header) and
    # tokenize(prompt up to the end of that answer's separator) are supervised; everything else is not.
    full = tok(prompt).input_ids
    expected = [IGNORE_INDEX] * len(full)
    pos = 0
    while (start := prompt.find(t.roles[1], pos)) >= 0:
        begin = start + len(t.roles[1])
        stop = prompt.index(t.sep, begin) + len(t.sep)
        lo, hi = len(tok(prompt[:begin]).input_ids), len(tok(prompt[:stop]).input_ids)
        expected[lo:hi] = full[lo:hi]
        pos = stop
    assert enc.labels.tolist() == expected
    assert any(l != IGNORE_INDEX for l in expected)


def test_internvl2_5_masks_the_newline_and_takes_the_system_turn(qwen2):
    t = get_template("internvl2_5")
    system, messages, _ = parse_conversations(conv("Hi", "Hello", system="Be brief."), t)
    enc = build_conversation_ids(messages, qwen2, t, [], system, text_only=True)
    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert enc.input_ids.tolist() == qwen2(prompt).input_ids
    kept = [i for i, l in zip(enc.input_ids.tolist(), enc.labels.tolist()) if l != IGNORE_INDEX]
    assert qwen2.decode(kept) == "Hello<|im_end|>"


def test_image_tokens_expand_per_image_in_order(qwen2):
    enc = encode("Hermes-2", qwen2, "multi_image")
    ids = enc.input_ids.tolist()
    ctx, start, end = (qwen2.convert_tokens_to_ids(t) for t in (IMG_CONTEXT_TOKEN, "<img>", "</img>"))
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == start:
            j = ids.index(end, i)
            assert set(ids[i + 1:j]) == {ctx}
            runs.append(j - i - 1)
            i = j
        i += 1
    assert runs == [512, 768, 256]
    assert enc.image_end == max(k for k, v in enumerate(ids) if v == end) + 1
    assert all(l == IGNORE_INDEX for i, l in zip(ids, enc.labels.tolist()) if i == ctx)


def test_grounding_tokens_pass_through(qwen2):
    enc = encode("Hermes-2", qwen2, "grounding")
    kept = [i for i, l in zip(enc.input_ids.tolist(), enc.labels.tolist()) if l != IGNORE_INDEX]
    assert qwen2.decode(kept) == "<ref>the helmet</ref><box>[[566, 680, 1000, 1000]]</box><|im_end|>"
    for special in ("<ref>", "</ref>", "<box>", "</box>"):
        assert qwen2.convert_tokens_to_ids(special) in kept


def test_internlm2_strips_values_and_keeps_bos_masked(tokenizers):
    tok = tokenizers["internlm2"]
    t = get_template("internlm2-chat")
    _, messages, _ = parse_conversations(conv("  Hi  ", "  Hello  "), t)
    enc = build_conversation_ids(messages, tok, t, [], text_only=True)
    assert enc.input_ids[0] == tok.bos_token_id and enc.labels[0] == IGNORE_INDEX
    assert enc.input_ids.tolist() == tok(t.prompt([("human", "Hi"), ("gpt", "Hello")])).input_ids


def test_plain_template_tokenizes_turn_by_turn(qwen2):
    t = get_template("plain")
    _, messages, _ = parse_conversations(conv("English caption:", "a cat on a sofa"), t)
    enc = build_conversation_ids(messages, qwen2, t, [], text_only=True)
    kept = [i for i, l in zip(enc.input_ids.tolist(), enc.labels.tolist()) if l != IGNORE_INDEX]
    assert qwen2.decode(kept) == "a cat on a sofa\n"


@pytest.mark.parametrize(
    "turns,template,message",
    [
        (conv("Hi", "Hello", "Again", system=None)[:2] + [{"from": "gpt", "value": "x"}], "Hermes-2", "alternate"),
        ([{"from": "user", "value": "Hi"}, {"from": "gpt", "value": "x"}], "Hermes-2", "expected \"human\" or \"gpt\""),
        (conv("Hi", "Hello", system="sys"), "Hermes-2", "does not support"),
        (conv("Hi", ""), "Hermes-2", "is empty"),
        (conv("Hi"), "Hermes-2", "no gpt turn"),
        (conv("Hi <|im_end|>", "x"), "Hermes-2", "reserved token"),
        ([{"from": "human", "text": "Hi"}], "Hermes-2", "keys \"from\" and \"value\""),
        ("not a list", "Hermes-2", "non-empty list"),
    ],
)
def test_conversation_errors_name_the_field(turns, template, message):
    with pytest.raises(DataError, match=message) as err:
        parse_conversations(turns, get_template(template), "data.jsonl:7")
    assert err.value.where == "data.jsonl:7" and err.value.fix


def test_leading_gpt_turn_is_dropped_with_a_warning():
    _, messages, warnings = parse_conversations(
        [{"from": "gpt", "value": "x"}] + conv("Hi", "Hello"), get_template("Hermes-2"))
    assert messages == [("human", "Hi"), ("gpt", "Hello")] and "dropped" in warnings[0]


def test_missing_placeholder_and_wrong_template_tokenizer(qwen2, tokenizers):
    t = get_template("Hermes-2")
    _, messages, _ = parse_conversations(conv("No placeholder", "x"), t)
    with pytest.raises(DataError, match="placeholder"):
        build_conversation_ids(messages, qwen2, t, [256], where="f.jsonl:3")
    with pytest.raises(DataError, match="conv_style"):  # Qwen2 has no <|user|> special token
        build_conversation_ids(messages, qwen2, get_template("phi3-chat"), [], text_only=True)


# A word-level tokenizer whose id of a token is its index here, so that a sample's ids and labels can be written down
# by hand. Words split at spaces; "\n" is a token of its own.
WORDS = ["<s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "\n", "system", "user", "assistant",
         SYSTEM_INTERNVL2_5, "Describe", "it.", "A", "cat.", "Why?", "It", "purrs.", "<unk>"]


def word_tokenizer(bos: bool):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), "isolated"),
                                                 pre_tokenizers.Split(" ", "removed")])
    tok.add_special_tokens(WORDS[:6])
    if bos:  # InternLM2 / InternLM3 style: BOS in front of every encoded text
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None)


@pytest.mark.parametrize("bos", [False, True], ids=["qwen2-style", "internlm-style"])
def test_internvl2_5_ids_and_labels_derived_by_hand(bos):
    """preprocess_internvl2_5 of the reference: every turn is ``<|im_start|>role\\n ... <|im_end|>\\n``; an answer's
    tokens and its <|im_end|> are supervised, its header and the trailing newline are not; a BOS-adding tokenizer
    gives one masked BOS in front; images expand in human turns."""
    t = get_template("internvl2_5")
    system, messages, _ = parse_conversations(conv("<image>\nDescribe it.", "A cat.", "Why?", "It purrs."), t)
    enc = build_conversation_ids(messages, word_tokenizer(bos), t, [3], system)
    s, e, nl, ctx = 1, 2, 6, 5  # <|im_start|>, <|im_end|>, "\n", <IMG_CONTEXT>
    ids = ([0] if bos else []) + [
        s, 7, nl, 10, e, nl,  # <|im_start|>system\n{system message}<|im_end|>\n
        s, 8, nl, 3, ctx, ctx, ctx, 4, nl, 11, 12, e, nl,  # <|im_start|>user\n<img>ctx x3</img>\nDescribe it.<|im_end|>\n
        s, 9, nl, 13, 14, e, nl,  # <|im_start|>assistant\nA cat.<|im_end|>\n
        s, 8, nl, 15, e, nl,  # <|im_start|>user\nWhy?<|im_end|>\n
        s, 9, nl, 16, 17, e, nl,  # <|im_start|>assistant\nIt purrs.<|im_end|>\n
    ]
    x = IGNORE_INDEX
    labels = ([x] if bos else []) + [x] * 6 + [x] * 13 + [x, x, x, 13, 14, e, x] + [x] * 6 + [x, x, x, 16, 17, e, x]
    assert enc.input_ids.tolist() == ids
    assert enc.labels.tolist() == labels
