"""Flags of chat, merge-lora and convert: underscore spellings, a help text each, hidden hyphen aliases, bool flags."""

from __future__ import annotations

import argparse

import pytest

from internvl_tune.cli import build_parser


def _command(name: str) -> argparse.ArgumentParser:
    parser = build_parser([name])
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


@pytest.mark.parametrize("name", ["chat", "merge-lora", "convert"])
def test_every_flag_has_help_and_underscores(name):
    parser = _command(name)
    texts = [parser.description, parser.epilog]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        texts.append(action.help)
        assert all("-" not in flag[2:] for flag in action.option_strings), action.option_strings
    assert not any("``" in text for text in texts)


def test_hyphen_spellings_still_work_but_are_not_listed():
    parser = _command("chat")
    args = parser.parse_args(["MODEL", "Hi", "--max-new-tokens", "7", "--max-tiles", "3"])
    assert (args.max_new_tokens, args.max_dynamic_patch) == (7, 3)
    assert parser.parse_args(["MODEL", "Hi"]).max_new_tokens == 512
    assert "--max-new-tokens" not in parser.format_help() and "--max_new_tokens" in parser.format_help()


@pytest.mark.parametrize("name, positionals", [("convert", ["SRC", "DST", "--to", "native"]), ("merge-lora", ["A", "--out", "O"])])
def test_overwrite_is_a_bool_flag(name, positionals):
    parser = _command(name)
    assert parser.parse_args(positionals).overwrite_output_dir is False
    for flag in ("--overwrite_output_dir", "--overwrite"):  # the training command's spelling, and the old one
        assert parser.parse_args(positionals + [flag]).overwrite_output_dir is True
        assert parser.parse_args(positionals + [flag, "False"]).overwrite_output_dir is False

