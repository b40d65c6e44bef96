"""Tokenizers of the InternVL LLM families, loaded without remote code.

Each family names the class its checkpoints load with (``families.Family.tokenizer_class``): transformers'
``Qwen2Tokenizer`` (vocab.json + merges.txt), our ``InternLM2Tokenizer`` / ``InternLM3Tokenizer`` (tokenizer.model,
whose releases name a remote-code class), or none, meaning the transformers class that ``tokenizer_config.json``
names (Phi-3, Yi: ``LlamaTokenizer``; Llama-3: ``PreTrainedTokenizerFast``). Without a family the class is read from
the files. The files a family's tokenizer is built from (``Family.tokenizer_files``) are checked before loading,
because the loaders fail late or not at all without them: ``Qwen2Tokenizer`` builds an empty vocabulary (the InternVL
tokens then get ids 0-8 and ``<IMG_CONTEXT>`` id 3 is written into the model), the sentencepiece and Llama classes
fail with messages about missing packages, and ``AutoTokenizer`` offers to run the checkpoint's remote code.

After loading, the nine InternVL tokens (``<img>`` ... ``</box>``) are added as special tokens in the reference order,
so checkpoints that already carry them keep their ids and fresh LLMs get the same new ids the reference gives them.
"""

from __future__ import annotations

import json
from pathlib import Path

from internvl_tune.constants import SPECIAL_TOKENS
from internvl_tune.errors import CheckpointError

# tokenizer_config.json `tokenizer_class` values seen in InternVL checkpoints -> the class we load them with.
_NAMED_CLASSES = {
    "Qwen2Tokenizer": "Qwen2Tokenizer",
    "Qwen2TokenizerFast": "Qwen2Tokenizer",
    "InternLM2Tokenizer": "InternLM2Tokenizer",
    "InternLM2TokenizerFast": "InternLM2Tokenizer",
    "InternLM3Tokenizer": "InternLM3Tokenizer",
    "LlamaTokenizer": "LlamaTokenizer",
    "LlamaTokenizerFast": "LlamaTokenizerFast",
    "PreTrainedTokenizerFast": "PreTrainedTokenizerFast",
    "TokenizersBackend": "PreTrainedTokenizerFast",  # transformers 5's name for it (GPT-OSS "-hf" saves)
}
# Our classes for tokenizers whose releases name a remote-code class.
OWN_CLASSES = ("InternLM2Tokenizer", "InternLM3Tokenizer")
# Only these had add_eos_token under the reference's transformers 4.37 (it loads every tokenizer with
# add_eos_token=False); a tokenizer.json-only tokenizer (Llama-3) kept its post-processor, BOS included, and passing
# the flag to PreTrainedTokenizerFast would rebuild that post-processor without BOS.
_ADD_EOS_FLAG = (*OWN_CLASSES, "LlamaTokenizer", "LlamaTokenizerFast")


def _named_class(path: Path) -> str | None:
    """The class ``tokenizer_config.json`` names, if it is one we know."""
    config_file = path / "tokenizer_config.json"
    name = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    return _NAMED_CLASSES.get(name)


def tokenizer_class(path: str | Path, family: str | None = None) -> str:
    """The tokenizer class to load the checkpoint directory ``path`` with: the family's, else the one its files name
    (``PreTrainedTokenizerFast`` / ``LlamaTokenizer`` for a ``tokenizer.json`` / ``tokenizer.model`` naming none)."""
    from internvl_tune.models.internvl_chat import families

    path = Path(path)
    own = families.get(family).tokenizer_class if family else None
    name = own or _named_class(path)
    if name:
        return name
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return "Qwen2Tokenizer"
    if (path / "tokenizer.json").is_file():  # never AutoTokenizer: without tokenizer_config.json it reads config.json,
        return "PreTrainedTokenizerFast"  # which names the release's remote code
    if (path / "tokenizer.model").is_file():
        return "LlamaTokenizer"
    raise CheckpointError(
        f"{path}: no tokenizer files found (tokenizer_config.json with vocab.json+merges.txt, tokenizer.model or "
        "tokenizer.json) — copy the tokenizer files of the checkpoint into this directory"
    )


def check_tokenizer_files(path: Path, family: str) -> None:
    """Raise a CheckpointError naming the missing files when ``path`` lacks what the ``family`` tokenizer needs."""
    from internvl_tune.models.internvl_chat import families

    options = families.get(family).tokenizer_files
    missing = [[name for name in option if not (path / name).is_file()] for option in options]
    if any(not m for m in missing):
        return
    needs = ", or ".join(" and ".join(option) for option in options)
    partial = [m for m, option in zip(missing, options) if len(m) < len(option)]
    found = f"missing: {', '.join(min(partial, key=len))}" if partial else "none of them is there"
    raise CheckpointError(f"{path}: the {family} tokenizer needs {needs}; {found} — copy the "
                          "tokenizer files of the base model (the release this checkpoint was trained from) into "
                          "this directory, or in Python pass them: load_pretrained(path, tokenizer=RELEASE_DIR)")


def add_internvl_tokens(tokenizer) -> int:
    """Add the nine InternVL special tokens like the reference does; returns how many were new."""
    return tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)


def load_tokenizer(path: str | Path, family: str | None = None, model_max_length: int | None = None,
                   internvl_tokens: bool = True):
    """Load the tokenizer of an InternVL checkpoint (any family) and add the InternVL special tokens.

    Args:
        path: checkpoint directory holding the tokenizer files.
        family: the checkpoint's LLM family name (``families.FAMILIES``); the class is read from the files when None.
        model_max_length: overrides the saved maximum length (the reference sets it to ``max_seq_length``).
        internvl_tokens: False leaves the InternVL tokens to the caller (:func:`add_internvl_tokens`, which says how
            many were new).

    Returns:
        A transformers tokenizer with the InternVL tokens registered; no end-of-sequence token is appended on encode.
    """
    path = Path(path)
    if family:
        check_tokenizer_files(path, family)
    name = tokenizer_class(path, family)
    kwargs: dict = {} if model_max_length is None else {"model_max_length": model_max_length}
    if name in _ADD_EOS_FLAG:
        kwargs["add_eos_token"] = False
    if name in OWN_CLASSES:
        from internvl_tune.models.internvl_chat import internlm2_tokenizer

        cls = getattr(internlm2_tokenizer, name)
    else:
        import transformers

        cls = getattr(transformers, name)  # transformers' own class, never remote code
    try:
        tokenizer = cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({name}): {exc}") from exc
    if internvl_tokens:
        add_internvl_tokens(tokenizer)
    return tokenizer
