"""``internvl-tune data check META_JSON``: validate a dataset before any GPU time is spent.

Exit status: 0 when no error was found (warnings allowed unless ``--strict``), 1 when problems were found.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from internvl_tune.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from internvl_tune.data.templates import TEMPLATES


def _help(name: str) -> str:
    """The training flag's own help text, so both commands explain a setting the same way."""
    import dataclasses

    from internvl_tune.train.config import DataArgs

    field = next(f for f in dataclasses.fields(DataArgs) if f.name == name)
    return f"{field.metadata['help']} (default: %(default)s)"


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text + ". Exits 0 only when no error is found.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("meta", metavar="META_JSON", help="the meta JSON (as passed to training with --meta_path)")
    p.add_argument("--model_name_or_path", help="checkpoint whose tokenizer (and template) to use; enables token checks")
    p.add_argument("--tokenizer", help="tokenizer directory, if not the checkpoint's")
    p.add_argument("--conv_style", choices=list(TEMPLATES), default=None,
                   help="conversation template (default: the checkpoint's `template`, else internlm2-chat)")
    p.add_argument("--max_seq_length", type=int, default=8192, help=_help("max_seq_length"))
    p.add_argument("--force_image_size", type=int, default=448, help=_help("force_image_size"))
    p.add_argument("--down_sample_ratio", type=float, default=0.5, help=_help("down_sample_ratio"))
    p.add_argument("--dynamic_image_size", type=_bool, default=False, metavar="BOOL", help=_help("dynamic_image_size"))
    p.add_argument("--use_thumbnail", type=_bool, default=False, metavar="BOOL", help=_help("use_thumbnail"))
    p.add_argument("--min_dynamic_patch", type=int, default=1, help=_help("min_dynamic_patch"))
    p.add_argument("--max_dynamic_patch", type=int, default=12, help=_help("max_dynamic_patch"))
    p.add_argument("--min_num_frame", type=int, default=8, help=_help("min_num_frame"))
    p.add_argument("--max_num_frame", type=int, default=32, help=_help("max_num_frame"))
    p.add_argument("--allow_outside_root", action="store_true", help="accept paths that leave their dataset root")
    p.add_argument("--max_errors", type=int, default=50, help="list at most this many problems")
    p.add_argument("--strict", action="store_true", help="warnings count as errors too")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N samples as tokenized (needs a tokenizer)")
    p.set_defaults(func=run)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _checkpoint_config(path: str | None) -> dict:
    if not path or not (Path(path) / "config.json").is_file():
        return {}
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except json.JSONDecodeError:
        return {}


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from internvl_tune.data.check import check_meta
    from internvl_tune.data.dataset import DataConfig

    console = Console()
    ckpt = _checkpoint_config(args.model_name_or_path)
    conv_style = args.conv_style or ckpt.get("template") or "internlm2-chat"
    if conv_style not in TEMPLATES:
        conv_style = "internlm2-chat"
    patch = (ckpt.get("vision_config") or {}).get("patch_size", 14)
    cfg = DataConfig(
        force_image_size=args.force_image_size, patch_size=patch, down_sample_ratio=args.down_sample_ratio,
        dynamic_image_size=args.dynamic_image_size, use_thumbnail=args.use_thumbnail,
        min_dynamic_patch=args.min_dynamic_patch, max_dynamic_patch=args.max_dynamic_patch,
        max_seq_length=args.max_seq_length, min_num_frame=args.min_num_frame, max_num_frame=args.max_num_frame,
        conv_style=conv_style, allow_outside_root=args.allow_outside_root,
    )
    tokenizer = None
    tok_path = args.tokenizer or args.model_name_or_path
    if tok_path:
        from internvl_tune.models.internvl_chat.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tok_path, model_max_length=args.max_seq_length)

    with Progress(TextColumn("checking"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("lines", total=None)

        def advance(n: int, total: int | None) -> None:
            if total is not None:
                bar.update(task, total=total)
            bar.advance(task, n)

        report = check_meta(args.meta, cfg, tokenizer, progress=advance, show=args.show if tokenizer else 0)
    _print_summary(console, report, cfg, tokenizer, args)
    failing = report.problems if args.strict else report.errors
    return 1 if failing else 0


def _print_summary(console, report, cfg, tokenizer, args) -> None:
    from rich.markup import escape
    from rich.table import Table

    from internvl_tune.data.check import length_histogram

    console.print(f"[bold]data check[/] {args.meta}  (template {cfg.conv_style}, {cfg.num_image_token} tokens per tile, "
                  f"dynamic tiles {'on, up to ' + str(cfg.max_dynamic_patch) if cfg.dynamic_image_size else 'off'})")
    if report.lines:
        table = Table(title="samples per epoch (repeat_time applied)")
        kinds = ("text", "image", "multi_image", "video")
        table.add_column("dataset")
        table.add_column("lines", justify="right")
        for k in kinds:
            table.add_column(k, justify="right")
        for name, n in report.lines.items():
            table.add_row(name, str(n), *(str(report.samples.get((name, k), 0)) for k in kinds))
        table.add_row("[bold]total", str(sum(report.lines.values())),
                      *(str(sum(v for (d, k2), v in report.samples.items() if k2 == k)) for k in kinds))
        console.print(table)
    if report.tiles_per_image:
        tiles = ", ".join(f"{t} tile{'s' if t > 1 else ''}: {n}" for t, n in sorted(report.tiles_per_image.items()))
        console.print(f"tiles per image (video frames count as 1): {tiles}")
    if tokenizer is not None and report.token_lengths:
        hist = length_histogram(report.token_lengths, cfg.max_seq_length)
        peak = max(c for _, c in hist) or 1
        table = Table(title="tokens per sample")
        table.add_column("tokens", justify="right")
        table.add_column("samples", justify="right")
        table.add_column("")
        for label, count in hist:
            table.add_row(label, str(count), "█" * round(30 * count / peak))
        console.print(table)
        console.print(f"estimated tokens per epoch: {report.tokens_per_epoch:,} "
                      f"({report.supervised_tokens:,} supervised)")
    elif tokenizer is None:
        console.print("[dim]token lengths, truncation and label checks need --model_name_or_path (or --tokenizer)[/]")
    for prepared in report.shown:
        _show_sample(console, prepared, tokenizer)
    shown = report.problems if args.strict else report.errors + report.warnings
    for problem in shown[: args.max_errors]:
        style = "red" if problem.error or args.strict else "yellow"
        console.print(f"[{style}]{'error' if problem.error else 'warning'}[/] {escape(str(problem))}", highlight=False,
                      soft_wrap=True)  # one line per problem, so it can be grepped
    if len(shown) > args.max_errors:
        console.print(f"... and {len(shown) - args.max_errors} more problem(s) (raise --max_errors to list them)")
    n_err, n_warn = len(report.errors), len(report.warnings)
    verdict = "[green]clean[/]" if not n_err and not (args.strict and n_warn) else "[red]problems found[/]"
    console.print(f"{verdict}: {n_err} error(s), {n_warn} warning(s)")


def _show_sample(console, prepared, tok) -> None:
    """Print one sample's tokens: image runs collapsed, supervised text in green."""
    from rich.markup import escape

    ids, labels = prepared.encoded.input_ids.tolist(), prepared.encoded.labels.tolist()
    tiles = [len(t) for t in prepared.tiles]
    console.rule(f"{prepared.sample_id} ({prepared.kind}, tiles {tiles}, {len(ids)} tokens)")
    out, i = [], 0
    context = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    while i < len(ids):
        j = i
        if ids[i] == context:
            while j < len(ids) and ids[j] == context:
                j += 1
            out.append(f"[cyan]{IMG_CONTEXT_TOKEN}×{j - i}[/]")
            i = j
            continue
        supervised = labels[i] != IGNORE_INDEX
        while j < len(ids) and ids[j] != context and (labels[j] != IGNORE_INDEX) == supervised:
            j += 1
        text = escape(tok.decode(ids[i:j]))
        out.append(f"[green]{text}[/]" if supervised else text)
        i = j
    console.print("".join(out), highlight=False)
