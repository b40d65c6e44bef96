"""Flag conventions shared by every sub-command: one spelling per concept, underscore names, booleans that take an
optional value, one dtype choice set.

One concept has one spelling in every command's ``--help``, the training command's (Hugging Face Trainer style):
``--model_name_or_path``, ``--output_dir`` (``--output_file`` where the output is one file),
``--overwrite_output_dir``, ``--dtype bf16|fp16|fp32`` (plus ``auto`` or ``keep`` where they mean something),
``--data_root``, ``--dynamic_image_size``, ``--max_dynamic_patch`` (README.md, "Flag conventions"). Other
spellings that scripts, the reference's launch scripts or clip_benchmark's command line pass (``--model``,
``--checkpoint``, ``--pretrained``, ``--out``, ``--out_dir``, ``--out-dir``, ``--overwrite``, ``--num-beams``, ...)
keep working as hidden aliases: accepted, parsed to the same value, left out of ``--help`` and of the completion
scripts. A boolean flag accepts ``--flag`` (True), ``--flag True`` and ``--flag False`` (also yes/no/1/0), as the
reference's launch scripts write them. Every flag has a help text.
"""

from __future__ import annotations

import argparse

from internvl_tune.options import str2bool

# the one dtype choice set; torch's names (and half / float) are accepted for them
DTYPES = ("bf16", "fp16", "fp32")
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def add_flag(parser, name: str, *aliases: str, **kwargs) -> argparse.Action:
    """``parser.add_argument(name, **kwargs)``, plus hidden ``aliases`` (other spellings of the same flag).

    Each alias is its own argument with the same destination, no default and no help, so it parses like ``name``
    but stays out of ``--help``, which lists only ``name``. A required flag is satisfied by any of its spellings
    (they form a required group whose error message names ``name`` alone).
    """
    required = kwargs.pop("required", False)
    if aliases and required:
        parser = parser.add_mutually_exclusive_group(required=True)
    action = parser.add_argument(name, required=required and not aliases, **kwargs)
    alias_kwargs = {k: v for k, v in kwargs.items() if k not in ("default", "help", "dest", "metavar")}
    for alias in aliases:
        parser.add_argument(alias, dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **alias_kwargs)
    return action


def add_bool_flag(parser, name: str, default: bool, help: str, dest: str | None = None,
                  aliases: tuple[str, ...] = (), negations: tuple[str, ...] = ()) -> None:
    """Add ``--name [True|False]`` to ``parser`` (an ArgumentParser or argument group), plus hidden ``aliases`` and
    hidden ``negations``: bare flags that set False (clip_benchmark's ``--no_amp`` for ``--amp False``)."""
    action = add_flag(parser, f"--{name}", *aliases, nargs="?", const=True, default=default, type=str2bool,
                      metavar="True|False", dest=dest or name, help=help)
    for negation in negations:
        parser.add_argument(negation, dest=action.dest, action="store_false", default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)


def dtype_name(text: str) -> str:
    """A ``--dtype`` value in the one choice set: ``bfloat16`` -> ``bf16``, ``float32`` -> ``fp32``, ..."""
    low = str(text).strip().lower()
    return DTYPE_ALIASES.get(low, low)


def add_dtype_flag(parser, default: str, help: str, special: tuple[str, ...] = ()) -> None:
    """``--dtype {special...,bf16,fp16,fp32}`` (``special``: ``auto`` or ``keep``, where the command has one)."""
    parser.add_argument("--dtype", type=dtype_name, choices=(*special, *DTYPES), default=default,
                        help=f"{help} (torch's names bfloat16, float16, float32 are accepted too)")


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` value; None for ``auto`` / ``keep`` (the command decides)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype_name(name))


def description(doc: str) -> str:
    """A docstring as ``--help`` text: RST ``code`` markup becomes plain `code`."""
    return doc.replace("``", "`")
