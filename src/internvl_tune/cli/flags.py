"""Flag conventions shared by every sub-command: underscore names, and booleans that take an optional value.

Multi-word flags are spelled with underscores (``--max_new_tokens``); a hyphen spelling that the reference's
scripts pass (``--num-beams``, ``--out-dir``) keeps working as a hidden alias. A boolean flag accepts ``--flag``
(True), ``--flag True`` and ``--flag False`` (also yes/no/1/0), as the reference's launch scripts write them. Every
flag has a help text.
"""

from __future__ import annotations

import argparse


def str2bool(text: str) -> bool:
    """Parse a boolean flag value: ``True``/``False`` (also yes/no/1/0/on/off, any case)."""
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_flag(parser, *names: str, **kwargs) -> argparse.Action:
    """``parser.add_argument`` where hyphen spellings of multi-word names (``--out-dir``) are hidden aliases.

    They parse like the shown names but stay out of ``--help``, which lists only the underscore spellings.
    """
    hidden = [n for n in names if n.startswith("--") and "-" in n[2:]]
    action = parser.add_argument(*(n for n in names if n not in hidden), **kwargs)
    for alias in hidden:
        if alias in parser._option_string_actions:
            raise ValueError(f"conflicting option string: {alias}")
        parser._option_string_actions[alias] = action  # argparse looks options up here when parsing
    return action


def add_bool_flag(parser, name: str, default: bool, help: str, dest: str | None = None,
                  aliases: tuple[str, ...] = ()) -> None:
    """Add ``--name [True|False]`` to ``parser`` (an ArgumentParser or argument group), plus hidden ``aliases``."""
    add_flag(parser, f"--{name}", *aliases, nargs="?", const=True, default=default, type=str2bool,
             metavar="True|False", dest=dest or name, help=help)


def description(doc: str) -> str:
    """A docstring as ``--help`` text: RST ``code`` markup becomes plain `code`."""
    return doc.replace("``", "`")
