"""``internvl-tune data prepare coco|flickr30k|nocaps --data_root data``: check the evaluation data tree.

Lists what is missing with the command that gets it, and writes what can be derived (the Flickr30K test json).
"""

from __future__ import annotations

import argparse

from internvl_tune.cli.flags import add_bool_flag, add_flag
from internvl_tune.eval.caption.prepare import LAYOUT, TASKS, check_dataset


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(
        name, help=help_text, description=help_text + ". Lists each missing file with the command that gets it, "
        "counts images and checks that every image an annotation names exists. Exit status 1 when anything is missing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("datasets", nargs="+", choices=[*LAYOUT, "all"], help="datasets to check")
    add_flag(parser, "--data_root", "--data-root", "--root", default="data",
             help="folder holding coco/, flickr30k/ and nocaps/")
    add_flag(parser, "--task", choices=[*TASKS, "all"], default="all",
             help="check only what caption evaluation or retrieval needs")
    add_bool_flag(parser, "check_only", False, "do not write flickr30k_test_karpathy.json from the txt",
                  aliases=("--check-only",))
    add_bool_flag(parser, "keep_commas", False,
                  "keep whole Flickr30K captions when converting (the InternVL release file cuts each caption at its "
                  "first comma; the default matches it, and so the published scores)", aliases=("--keep-commas",))
    parser.set_defaults(func=run)


def run(args) -> int:
    names = list(LAYOUT) if "all" in args.datasets else list(dict.fromkeys(args.datasets))
    tasks = TASKS if args.task == "all" else (args.task,)
    reports = [check_dataset(n, args.data_root, tasks
, convert=not args.check_only, keep_commas=args.keep_commas)
               for n in names]
    for report in reports:
        print("\n".join(report.lines))
    bad = [r for r in reports if not r.ok]
    missing = sum(len(r.missing) for r in reports)
    problems = sum(len(r.problems) for r in reports)
    if bad:
        print(f"\n{missing} missing file(s), {problems} problem(s) in {', '.join(r.name for r in bad)}; "
              "run the commands above, then this check again.")
        return 1
    print(f"\nall needed files present for {', '.join(names)} ({' and '.join(tasks)}).")
    return 0
