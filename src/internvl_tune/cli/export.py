"""``internvl-tune export --check DIR``: is an exported folder ready for vLLM, LMDeploy, SGLang and transformers?

Prints a checklist (files, config keys, remote code, chat template, dtype, image tokens) and, per server, ready or
not; exits 1 when a check a chosen server requires fails (docs/checkpoints.md, "Serving").
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  internvl-tune export --check work_dirs/run                       (every server)
  internvl-tune export --check out/original --server vllm,lmdeploy"""


def register(subparsers, name: str, help_text: str) -> None:
    from internvl_tune.cli.flags import add_flag
    from internvl_tune.models.internvl_chat.serving import SERVERS

    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "--check", required=True, metavar="DIR",
             help="a model folder (a run's output_dir, a convert or merge-lora output) to check")
    add_flag(parser, "--server", default=",".join(SERVERS),
             help=f"comma-separated servers whose requirements count for the exit status: {', '.join(SERVERS)} "
                  "(default: all)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from internvl_tune.errors import UserError
    from internvl_tune.models.internvl_chat.serving import SERVERS, check_folder

    servers = [s.strip().lower() for s in args.server.split(",") if s.strip()]
    unknown = [s for s in servers if s not in SERVERS]
    if unknown or not servers:
        raise UserError(f"--server {args.server}: unknown {', '.join(unknown) or '(none given)'}; use "
                        f"{', '.join(SERVERS)}")
    report = check_folder(args.check)
    print(report.text(servers))
    return 1 if report.failed(servers) else 0
