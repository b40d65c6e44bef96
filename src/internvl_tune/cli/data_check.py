"""``internvl-tune data check META_JSON``: validate a dataset before any GPU time is spent.

Exit status: 0 when no error was found (warnings allowed unless ``--strict``), 1 when problems were found.
"""

from __future__ import annotations

import dataclasses

from internvl_tune.cli.flags import add_bool_flag
from internvl_tune.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from internvl_tune.data.config import DataConfig
from internvl_tune.data.templates import THINKING_SYSTEM_MESSAGE

# training-only settings that change nothing a check looks at
NOT_CHECKED = {"meta_path", "eval_meta_path", "use_packed_ds", "max_packed_tokens", "num_images_expected",
               "loss_reduction", "group_by_length"}


def register(subparsers, name: str, help_text: str) -> None:
    from internvl_tune.options import add_dataclass_flags

    p = subparsers.add_parser(name, help=help_text, description=help_text + ". Exits 0 only when no error is found.")
    p.add_argument("meta", metavar="META_JSON", help="the meta JSON, the file training reads as its meta_path")
    p.add_argument("--model_name_or_path", help="checkpoint whose tokenizer, template and tile settings to use; "
                                                "enables token-length and label checks")
    p.add_argument("--tokenizer", help="tokenizer directory, if not the checkpoint's")
    group = p.add_argument_group("data settings (as for training; the checkpoint's when not given)")
    add_dataclass_flags(group, DataConfig, skip=NOT_CHECKED)
    from internvl_tune.models.internvl_chat.objectives import OBJECTIVES

    group.add_argument("--objective", choices=tuple(OBJECTIVES), default="sft",
                       help="the training objective whose lines these are: " + "; ".join(
                           f"{o.name}: {o.reader.__name__}" for o in OBJECTIVES.values()) + " (default: sft)")
    p.add_argument("--max_errors", type=int, default=50, help="list at most this many problems (default: 50)")
    add_bool_flag(p, "strict", False, "warnings count as errors too (default: False)")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="print the first N samples as tokenized, image tokens collapsed, answers highlighted "
                        "(needs a tokenizer; default: 0)")
    p.set_defaults(func=run)


def data_config(args, defaults) -> DataConfig:
    """The DataConfig of the flags, resolved against the checkpoint's settings."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig) if hasattr(args, f.name)}
    return DataConfig(**values).resolve(defaults, args.model_name_or_path or "the reference defaults")


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from internvl_tune.data.check import check_meta
    from internvl_tune.data.config import RELEASE_DEFAULTS
    from internvl_tune.models.internvl_chat.objectives import OBJECTIVES

    console = Console()
    defaults = RELEASE_DEFAULTS
    if args.model_name_or_path:
        from internvl_tune.models.internvl_chat.config import checkpoint_data_defaults

        defaults = checkpoint_data_defaults(args.model_name_or_path)
    cfg = data_config(args, defaults)
    tokenizer = None
    tok_path = args.tokenizer or args.model_name_or_path
    if tok_path:
        from internvl_tune.models.internvl_chat.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tok_path, model_max_length=cfg.max_seq_length)

    with Progress(TextColumn("checking"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("lines", total=None)

        def advance(n: int, total: int | None) -> None:
            if total is not None:
                bar.update(task, total=total)
            bar.advance(task, n)

        report = check_meta(args.meta, cfg, tokenizer, progress=advance, show=args.show if tokenizer else 0,
                            reader=OBJECTIVES[args.objective].reader)
    _print_summary(console, report, cfg, tokenizer, args)
    failing = report.problems if args.strict else report.errors
    return 1 if failing else 0


def _print_summary(console, report, cfg, tokenizer, args) -> None:
    from rich.markup import escape
    from rich.table import Table

    from internvl_tune.data.check import length_histogram

    tiles = (f"dynamic tiles {cfg.min_dynamic_patch}-{cfg.max_dynamic_patch}" + (" + thumbnail" if cfg.use_thumbnail else "")
             if cfg.dynamic_image_size else "one tile per image")
    source = "" if args.model_name_or_path else "; no model given: the released checkpoints' settings"
    console.print(f"[bold]data check[/] {escape(args.meta)}  (template {cfg.conv_style}, {cfg.force_image_size} px tiles x "
                  f"{cfg.num_image_token} tokens, {tiles}{source})")
    for notice in report.notices:
        console.print(f"[yellow]note[/] {escape(notice)}", highlight=False, soft_wrap=True)
    console.print(f"system message (samples without their own): {_system_kind(cfg)}; thinking answers "
                  f"(<think>...</think> first): {report.thinking_answers} of {report.answers}")
    if report.thinking_answers and cfg.system_message != THINKING_SYSTEM_MESSAGE:
        console.print("[yellow]note[/] answers think first but the system message does not ask for it: InternVL3.5 "
                      "thinks when its thinking prompt is the system message (--thinking_mode on)")
    if report.lines:
        table = Table(title="samples per epoch (repeat_time applied)")
        kinds = ("text", "image", "multi_image", "video")
        table.add_column("dataset")
        table.add_column("format")
        table.add_column("lines", justify="right")
        for k in kinds:
            table.add_column(k, justify="right")
        for name, n in report.lines.items():
            table.add_row(name, report.formats.get(name, ""), str(n),
                          *(str(report.samples.get((name, k), 0)) for k in kinds))
        table.add_row("[bold]total", "", str(sum(report.lines.values())),
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


def _system_kind(cfg) -> str:
    """How the resolved system message came about, in words."""
    if cfg.system_message is None:
        return "the template's default"
    if cfg.system_message == THINKING_SYSTEM_MESSAGE:
        return f"InternVL3.5's thinking prompt (--thinking_mode {cfg.thinking_mode})"
    return "the checkpoint's own (config.json system_message)"


def _show_sample(console, prepared, tok) -> None:
    """Print one sample's tokens (a preference pair: chosen, then rejected)."""
    rows = getattr(prepared.encoded, "rows", None)
    for side, row in zip(("chosen, ", "rejected, "), rows) if rows else [("", prepared.encoded)]:
        _show_row(console, prepared, row, tok, side)


def _show_row(console, prepared, row, tok, side: str) -> None:
    """Print one token row: image runs collapsed, supervised text in green."""
    from rich.markup import escape

    ids, labels = row.input_ids.tolist(), row.labels.tolist()
    tiles = [len(t) for t in prepared.tiles]
    console.rule(f"{prepared.sample_id} ({side}{prepared.kind}, tiles {tiles}, {len(ids)} tokens)")
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
