"""Compatibility entry for the InternVL README's ``python3 clip_benchmark/cli.py eval ...`` command line.

It forwards the ``eval`` arguments to ``internvl-tune eval retrieval`` (same flags, same JSON output), so the seed
command works unchanged from the repository root once the package is installed (``pip install -e .``).
"""

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "eval":
        print("usage: python3 clip_benchmark/cli.py eval --model_type internvl --task zeroshot_retrieval "
              "--dataset flickr30k --dataset_root DIR --model internvl_c_retrieval_hf --pretrained PATH "
              "--output result.json\n(only `eval` for zero-shot retrieval is provided; it runs "
              "`internvl-tune eval retrieval`)", file=sys.stderr)
        return 2
    from internvl_tune.cli import main as internvl_tune_main

    return internvl_tune_main(["eval", "retrieval", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
