"""``internvl-tune report RUN_DIR [RUN_DIR ...]``: rebuild a run's ``report.html`` from its files, or compare runs.

    internvl-tune report work_dirs/my_run                      -> work_dirs/my_run/report.html
    internvl-tune report work_dirs/lora_r8 work_dirs/lora_r16 --output_file compare.html
    internvl-tune report results/eval_chat                     -> the page of an `eval chat` output folder

One self-contained HTML file (inline SVG charts, images as base64, no network): the command, the plan, the curves,
the evaluation tables, generated answers beside their images, the data summary and the configuration. Several run
directories give one page with their numbers side by side and their curves overlaid.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from internvl_tune.cli.flags import add_flag, description


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=description(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="training run output directories (or the output folder of `eval chat`)")
    add_flag(p, "--output_file", "--out", default=None,
             help="the HTML file to write (default: RUN_DIR/report.html for one run, ./compare.html for several)")

    p.set_defaults(func=run)


def run(args) -> int:
    from internvl_tune.report import write_compare_report, write_eval_chat_report, write_run_report

    if len(args.runs) == 1:
        folder = Path(args.runs[0])
        is_eval = (folder / "scores.json").is_file() and not (folder / "metrics.jsonl").is_file()
        path = (write_eval_chat_report if is_eval else write_run_report)(folder, args.output_file)
    else:
        path = write_compare_report(args.runs, args.output_file or "compare.html")

    print(path)
    return 0
