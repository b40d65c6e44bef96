"""Flag conventions shared by every sub-command: underscore names, and booleans that take an optional value.

A boolean flag accepts ``--flag`` (True), ``--flag True`` and ``--flag False`` (also yes/no/1/0), as the
reference's launch scripts write them; every flag has a help text.
"""

from __future__ import annotations

from internvl_tune.options import str2bool


def add_bool_flag(parser, name: str, default: bool, help: str, dest: str | None = None) -> None:
    """Add ``--name [True|False]`` to ``parser`` (an ArgumentParser or argument group)."""
    parser.add_argument(f"--{name}", nargs="?", const=True, default=default, type=str2bool, metavar="True|False",
                        dest=dest or name, help=help)
