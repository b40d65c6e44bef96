"""Parts for testing `bench verify`'s runner: they import nothing heavy, so their processes start in a blink."""

import os
import time

from internvl_tune.bench.verify import Skip


def passing(ctx):
    ctx.record(value=1.5)
    ctx.check("one is one", True, "1 == 1")
    ctx.target("a goal that is missed", False, "0 < 1")
    ctx.summary("value 1.5")


def failing(ctx):
    ctx.record(value=float("nan"))
    ctx.check("loss finite", False, "nan")


def crashing(ctx):
    ctx.record(before_the_crash=3)
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def skipping(ctx):
    raise Skip("needs a package that is not installed")


def sleeping(ctx):
    ctx.record(first_round=42.0)
    time.sleep(600)


def dying(ctx):
    ctx.record(started=True)
    os._exit(3)  # as a process killed by the kernel's OOM killer would vanish: no result status written


def build_parser():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--bad", action="store_true")
    return parser


def run(args):
    """A bench script's run(args) -> dict, as another helper's GRPO bench would be."""
    losses = [1.0 / (i + 1) for i in range(args.steps)] + ([float("inf")] if args.bad else [])
    return {"losses": losses, "tokens_per_s": 1234.5, "peak_gib": 10.0, "estimate_gib": 9.0}
