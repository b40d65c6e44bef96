"""Tokenizers of the InternVL LLM families, loaded without remote code.

Families and the files their checkpoints ship:

| family    | files                                              | class we load with                 |
|-----------|----------------------------------------------------|------------------------------------|
| qwen2     | vocab.json, merges.txt (+ tokenizer.json)           | transformers ``Qwen2Tokenizer``     |
| internlm2 | tokenizer.model (sentencepiece)                     | our ``InternLM2Tokenizer``          |
| internlm3 | tokenizer.model (sentencepiece)                     | our ``InternLM3Tokenizer``          |
| phi3      | tokenizer.model (+ tokenizer.json)                  | transformers ``LlamaTokenizer``     |
| llama     | tokenizer.model (Yi) or tokenizer.json (Llama-3)    | transformers ``AutoTokenizer``      |

After loading, the nine InternVL tokens (``<img>`` ... ``</box>``) are added as special tokens in the reference order,
so checkpoints that already carry them keep their ids and fresh LLMs get the same new ids the reference gives them.
"""

from __future__ import annotations

import json
from pathlib import Path

from internvl_tune.constants import SPECIAL_TOKENS
from internvl_tune.errors import CheckpointError

# tokenizer_config.json `tokenizer_class` values seen in InternVL2 checkpoints -> our family names.
_CLASS_TO_FAMILY = {
    "Qwen2Tokenizer": "qwen2",
    "Qwen2TokenizerFast": "qwen2",
    "InternLM2Tokenizer": "internlm2",
    "InternLM2TokenizerFast": "internlm2",
    "InternLM3Tokenizer": "internlm3",
    "LlamaTokenizer": "llama",
    "LlamaTokenizerFast": "llama",
    "PreTrainedTokenizerFast": "llama",
}
FAMILIES = ("qwen2", "internlm2", "internlm3", "phi3", "llama")
# The files each family's tokenizer is built from: one of the alternatives must be complete. Checked before loading,
# because the loaders fail late or not at all without them: Qwen2Tokenizer builds an empty vocabulary (the InternVL
# tokens then get ids 0-8 and <IMG_CONTEXT> id 3 is written into the model), the sentencepiece and Llama classes
# fail with messages about missing packages, and AutoTokenizer offers to run the checkpoint's remote code.
TOKENIZER_FILES = {
    "qwen2": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
    "internlm2": (("tokenizer.model",),),
    "internlm3": (("tokenizer.model",),),
    "phi3": (("tokenizer.model",), ("tokenizer.json",)),
    "llama": (("tokenizer.model",), ("tokenizer.json",)),  # Yi: tokenizer.model; Llama-3: tokenizer.json
}


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


def check_tokenizer_files(path: Path, family: str) -> None:
    """Raise a CheckpointError naming the missing files when ``path`` lacks what the ``family`` tokenizer needs."""
    options = TOKENIZER_FILES[family]
    missing = [[name for name in option if not (path / name).is_file()] for option in options]
    if any(not m for m in missing):
        return
    needs = ", or ".join(" and ".join(option) for option in options)
    partial = [m for m, option in zip(missing, options) if len(m) < len(option)]
    found = f"missing: {', '.join(min(partial, key=len))}" if partial else "none of them is there"
    raise CheckpointError(f"{path}: the {family} tokenizer needs {needs}; {found} — copy the "
                          "tokenizer files of the base model (the release this checkpoint was trained from) into "
                          "this directory")


def add_internvl_tokens(tokenizer) -> int:
    """Add the nine InternVL special tokens like the reference does; returns how many were new."""
    return tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)


def load_tokenizer(path: str | Path, family: str | None = None, model_max_length: int | None = None):
    """Load the tokenizer of an InternVL2 checkpoint (any family) and add the InternVL special tokens.

    Args:
        path: checkpoint directory holding the tokenizer files.
        family: one of ``FAMILIES``; guessed from the files when None.
        model_max_length: overrides the saved maximum length (the reference sets it to ``max_seq_length``).

    Returns:
        A transformers tokenizer with the InternVL tokens registered; no end-of-sequence token is appended on encode.
    """
    path = Path(path)
    family = family or tokenizer_family(path)
    if family not in FAMILIES:
        raise CheckpointError(f"unknown tokenizer family {family!r}; expected one of {', '.join(FAMILIES)}")
    check_tokenizer_files(path, family)
    # The reference loads every tokenizer with add_eos_token=False: prompts never get an automatic end token.
    kwargs: dict = {} if model_max_length is None else {"model_max_length": model_max_length}
    try:
        if family == "qwen2":
            from transformers import Qwen2Tokenizer

            tokenizer = Qwen2Tokenizer.from_pretrained(str(path), **kwargs)
        elif family in ("internlm2", "internlm3"):
            from internvl_tune.models.internvl_chat import internlm2_tokenizer

            cls = internlm2_tokenizer.InternLM2Tokenizer if family == "internlm2" else internlm2_tokenizer.InternLM3Tokenizer
            tokenizer = cls.from_pretrained(str(path), add_eos_token=False, **kwargs)
        else:
            import transformers

            # The class named in tokenizer_config.json, from transformers itself (never remote code).
            config_file = path / "tokenizer_config.json"
            if config_file.is_file():
                name = json.loads(config_file.read_text()).get("tokenizer_class")
            else:  # without it AutoTokenizer would read config.json, which names remote code
                name = "PreTrainedTokenizerFast" if (path / "tokenizer.json").is_file() else "LlamaTokenizer"
            cls = getattr(transformers, name if name in _CLASS_TO_FAMILY else "AutoTokenizer")
            # Only the sentencepiece Llama classes had add_eos_token under the reference's transformers 4.37; a
            # tokenizer.json-only tokenizer (Llama-3) kept its post-processor, BOS included. Passing the flag to
            # PreTrainedTokenizerFast would rebuild that post-processor without BOS.
            if name in ("LlamaTokenizer", "LlamaTokenizerFast"):
                kwargs["add_eos_token"] = False
            tokenizer = cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load the {family} tokenizer: {exc}") from exc
    add_internvl_tokens(tokenizer)
    return tokenizer
