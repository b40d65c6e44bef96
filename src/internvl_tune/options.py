"""Config fields that document themselves: every dataclass field of a config section carries its help text.

Command-line parsers (``train/config.py``, ``internvl-tune data check``) are built from these fields, so a setting is
declared once, with one default and one explanation, wherever it is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def option(default, help: str, choices: tuple | None = None, flag: bool = True):
    """A dataclass field with its ``--help`` text; ``flag=False`` keeps it off the command line (derived values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def is_flag(f: dataclasses.Field) -> bool:
    """True for fields that are command-line flags."""
    return f.metadata.get("flag", True)


def str2bool(text: str) -> bool:
    """Parse a boolean flag or YAML value: ``True``/``False`` (also yes/no/1/0/on/off, any case)."""
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def base_type(tp):
    """``int | None`` -> int; ``str`` -> str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, section: str | None = None,
                        skip: set[str] = frozenset()) -> None:
    """Add one ``--field`` flag per flag field of a config dataclass, with the field's help and default.

    Args:
        parser: the parser (or argument group) to add to.
        cls: the dataclass.
        section: the run-config section (``model``, ``data``, ``train``): flags then default to SUPPRESS and land
            in ``section.field`` so YAML values are not overwritten (see :func:`load_config`); None keeps plain
            ``dest`` names and the dataclass defaults (``internvl-tune data check``).
        skip: field names to leave out.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not is_flag(f) or f.name in skip:
            continue
        tp = base_type(hints[f.name])
        help_text = f.metadata["help"]
        if "(default:" not in help_text:  # fields whose default is "the checkpoint's" say so themselves
            help_text += f" (default: {f.default})"
        kwargs = dict(default=argparse.SUPPRESS, dest=f"{section}.{f.name}") if section else dict(default=f.default)
        if tp is bool:
            parser.add_argument(f"--{f.name}", nargs="?", const=True, type=str2bool, metavar="True|False",
                                help=help_text, **kwargs)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(f"--{f.name}", type=tp, choices=choices, help=help_text,
                                metavar=None if choices else f.name.upper(), **kwargs)
