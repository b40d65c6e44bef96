"""Flag conventions shared by every sub-command: underscore names, and booleans that take an optional value.

Multi-word flags are spelled with underscores (``--max_new_tokens``); a hyphen spelling that the reference's
scripts pass (``--num-beams``, ``--out-dir``) keeps working as a hidden alias. A boolean flag accepts ``--flag``
(True), ``--flag True`` and ``--flag False`` (also yes/no/1/0), as the reference's launch scripts write them. Every
flag has a help text.
"""

from __future__ import annotations

import argparse

from internvl_tune.options import str2bool


def add_flag(parser, *names: str, **kwargs) -> argparse.Action:
    """``parser.add_argument`` where hyphen spellings of multi-word names (``--out-dir``) are hidden aliases.

    Each alias is its own argument with the same destination, no default and no help, so it parses like the shown
    names but stays out of ``--help``, which lists only the underscore spellings.
    """
    hidden = [n for n in names if n.startswith("--") and "-" in n[2:]]
    action = parser.add_argument(*(n for n in names if n not in hidden), **kwargs)
    alias_kwargs = {k: v for k, v in kwargs.items() if k not in ("default", "help", "dest", "required")}
    for alias in hidden:
        parser.add_argument(alias, dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **alias_kwargs)
    return action


def add_bool_flag(parser, name: str, default: bool, help: str, dest: str | None = None,
                  aliases: tuple[str, ...] = ()) -> None:
    """Add ``--name [True|False]`` to ``parser`` (an ArgumentParser or argument group), plus hidden ``aliases``."""
    add_flag(parser, f"--{name}", *aliases, nargs="?", const=True, default=default, type=str2bool,
             metavar="True|False", dest=dest or name, help=help)


def description(doc: str) -> str:
    """A docstring as ``--help`` text: RST ``code`` markup becomes plain `code`."""
    return doc.replace("``", "`")
