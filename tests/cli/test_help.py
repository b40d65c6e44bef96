"""Every command's ``--help``: it exits 0, every flag is explained, multi-word flags are spelled with underscores,
and no RST markup leaks into the text."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

from internvl_tune.cli import COMMANDS, GROUPS, build_parser, main
from internvl_tune.cli.bench import SCRIPTS

ALL_PATHS = [(), *((name,) for name, _, _ in COMMANDS),
             *((group, name) for group, commands in GROUPS.items() for name, _, _ in commands)]

BENCH_SCRIPTS = sorted(SCRIPTS)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices[name]


def _problems(parser: argparse.ArgumentParser) -> list[str]:
    """What breaks the conventions in one parser's flags and texts."""
    found = []
    texts = [parser.description or "", parser.epilog or ""]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:  # -h; hidden aliases
            continue
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            found.append(f"{name}: no help text")
        texts.append(action.help or "")
        for choice in getattr(action, "_choices_actions", []):  # the listed sub-commands
            if not (choice.help or "").strip():
                found.append(f"{name} {choice.dest}: no help text")
            texts.append(choice.help or "")
        found += [f"{opt}: shown with hyphens; spell it {'--' + opt[2:].replace('-', '_')} (keep {opt} hidden)"
                  for opt in action.option_strings if opt.startswith("--") and "-" in opt[2:]]
    found += [f"RST markup in {text[:60]!r}" for text in texts if "``" in text]
    options = {opt for action in parser._actions for opt in action.option_strings}
    for action in parser._actions:  # a flag's help may point at other flags: they must exist in this command
        for mentioned in re.findall(r"--[a-z][a-z0-9_]*", action.help or ""):
            if mentioned not in options:
                found.append(f"{'/'.join(action.option_strings) or action.dest}: help names {mentioned}, "
                             f"which this command lacks")
    return found


def _help_output(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("path", ALL_PATHS, ids=lambda p: " ".join(p) or "internvl-tune")
def test_command_help(path, capsys):
    parser = build_parser(list(path))
    for name in path:
        parser = _subparser(parser, name)
    assert _problems(parser) == []
    out = _help_output(list(path), capsys)
    assert out.startswith("usage: ") and "``" not in out


@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_bench_script_help(script, capsys):
    assert _problems(importlib.import_module(SCRIPTS[script][0]).build_parser()) == []
    out = _help_output(["bench", script], capsys)
    assert out.startswith("usage: ") and "``" not in out


def test_hyphen_spellings_parse_as_hidden_aliases():
    """The reference's evaluate scripts pass --num-beams, --out-dir, --batch-size ...; they keep working."""
    argv = ["eval", "caption", "--checkpoint", "m", "--num-beams", "3", "--out-dir", "o", "--batch-size", "2",
            "--max-new-tokens", "9", "--min-new-tokens", "1", "--data-root", "d", "--max-num", "4",
            "--num-workers", "0", "--dynamic"]
    args = build_parser(argv).parse_args(argv)
    assert (args.model_name_or_path, args.num_beams, args.output_dir, args.batch_size, args.max_new_tokens,
            args.min_new_tokens, args.data_root, args.max_dynamic_patch, args.num_workers,
            args.dynamic_image_size) == ("m", 3, "o", 2, 9, 1, "d", 4, 0, True)
    argv = ["data", "prepare", "coco", "--data-root", "d", "--check-only", "--keep-commas", "False"]
    args = build_parser(argv).parse_args(argv)
    assert (args.data_root, args.check_only, args.keep_commas) == ("d", True, False)

    argv = ["tiny-model", "--like", "internvl2-1b", "--out", "o", "--image-size", "28"]
    assert build_parser(argv).parse_args(argv).image_size == 28


def test_the_checks_catch_what_they_look_for():
    parser = argparse.ArgumentParser(description="see ``x``")
    parser.add_argument("--out-dir")
    parser.add_argument("--seed", help="")
    assert _problems(parser) == ["--out-dir: no help text", "--out-dir: shown with hyphens; spell it --out_dir "
                                 "(keep --out-dir hidden)", "--seed: no help text", "RST markup in 'see ``x``'"]
