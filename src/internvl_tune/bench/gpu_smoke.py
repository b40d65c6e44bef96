"""The training CLIs on a GPU with tiny checkpoints: compiled and eager runs must agree.

Run on a GPU box: ``python -m internvl_tune.bench.gpu_smoke --out /tmp/smoke``. It writes tiny InternVL2-2B and
InternVL-14B checkpoints, then runs ``internvl-tune train`` (packed rows, bf16) with ``--torch_compile False`` and
``True`` on the bundled sample's image and text samples: full fine-tuning, and LoRA with activation checkpointing
(the checkpoint inside the compiled region; dropout 0 so both runs draw nothing random), plus a compiled,
checkpointed LoRA + drop-path run whose random ops are recomputed under compilation; and ``internvl-tune
retrieval-train`` (head recipe) on its Flickr30K mini-set with ``--torch_compile True``. Prints the losses side by
side; exits 1 when a run fails or compiled and eager losses differ by more than bf16 noise.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from internvl_tune.cli import main as cli
from internvl_tune.cli.flags import description
from internvl_tune.train.metrics import read_jsonl

SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "sample"


def _meta(out: Path) -> Path:
    """The sample's meta file without the video kind (PyAV may be missing on a GPU box), with absolute roots."""
    meta = json.loads((SAMPLE / "meta.json").read_text())
    keep = {name: {**spec, "root": str(SAMPLE / spec["root"]), "annotation": str(SAMPLE / spec["annotation"])}
            for name, spec in meta.items() if name != "sample_video"}
    path = out / "meta.json"
    path.write_text(json.dumps(keep, indent=2))
    return path


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


TOLERANCE = 0.05  # worst relative loss difference of compiled and eager runs (bf16 noise: 1.1e-4 on an H100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="working directory (checkpoints and runs)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of each run")
    return parser


def run(out: Path, steps: int, workers: int = 2, compiled: str = "True", tolerance: float = TOLERANCE) -> dict:
    """Every run of the smoke test in ``out``: ``{"runs": {name: {"exit", "losses"}}, "pairs": {name: worst
    relative difference}, "ok"}``. ``compiled``: the ``--torch_compile`` value of the compiled side ("False" makes
    every run eager: a CPU test of this code, where inductor would take minutes)."""
    out.mkdir(parents=True, exist_ok=True)
    chat_ckpt, cg_ckpt = out / "tiny-InternVL2-2B", out / "tiny-InternVL-14B"
    for like, ckpt in (("internvl2-2b", chat_ckpt), ("internvl-14b", cg_ckpt)):
        if not ckpt.exists():
            cli(["tiny-model", "--like", like, "--out", str(ckpt)])
    meta = _meta(out)
    common = ["--max_steps", str(steps), "--report_to", "none", "--dataloader_num_workers", str(workers),
              "--bf16", "True", "--overwrite_output_dir", "True", "--learning_rate", "1e-3",
              "--lr_scheduler_type", "constant"]
    chat = ["train", "--model_name_or_path", str(chat_ckpt), "--meta_path", str(meta), "--conv_style", "internlm2-chat",
            "--force_image_size", "56", "--dynamic_image_size", "True", "--max_dynamic_patch", "4", "--use_packed_ds",
            "True", "--max_packed_tokens", "1024", "--freeze_backbone", "True", *common]
    lora = ["--use_llm_lora", "8", "--freeze_llm", "True", "--freeze_mlp", "True", "--grad_checkpoint", "True"]
    runs = {}

    def record(name: str, run_dir: Path, argv: list[str]) -> None:
        code = cli([*argv, "--output_dir", str(run_dir)])
        runs[name] = {"exit": code, "losses": _losses(run_dir) if code == 0 else []}

    pairs = {"train, packed": [], "train, packed, LoRA + ckpt": [*lora, "--lora_dropout", "0"]}
    for name, extra in pairs.items():
        for side, setting in (("eager", "False"), ("compiled", compiled)):
            tag = f"{name.replace(', ', '_').replace(' + ', '_').replace(' ', '_')}_{side}"
            record(f"{name}, {side}", out / tag, [*chat, *extra, "--torch_compile", setting])
    record("train, LoRA dropout + drop path + ckpt, compiled", out / "chat_lora_dropout_droppath_ckpt_compiled",
           [*chat, *lora, "--lora_dropout", "0.05", "--drop_path_rate", "0.1", "--freeze_backbone", "False",
            "--torch_compile", compiled])
    record("retrieval-train head, compiled", out / "retrieval_compiled",
           ["retrieval-train", "--model_name_or_path", str(cg_ckpt), "--dataset_name", "flickr30k_en_train",
            "--data_root", str(SAMPLE), "--force_image_size", "28", "--freeze_model", "True",
            "--unfreeze_qllama_head", "True", "--per_device_train_batch_size", "8", "--torch_compile", compiled,
            *common])
    ok = all(r["exit"] == 0 and r["losses"] and all(math.isfinite(x) for x in r["losses"]) for r in runs.values())
    worst = {}
    for name in pairs:
        eager, fused = runs[f"{name}, eager"]["losses"], runs[f"{name}, compiled"]["losses"]
        if eager and fused and len(eager) == len(fused):
            worst[name] = max(abs(a - b) / abs(a) for a, b in zip(eager, fused))
        ok = ok and worst.get(name, float("inf")) < tolerance
    return {"runs": runs, "pairs": worst, "ok": ok, "tolerance": tolerance, "compiled": compiled}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(Path(args.out), args.steps)
    for name, worst in result["pairs"].items():
        print(f"{name}: compiled vs eager losses, worst relative difference {worst:.2e}")
    for name, r in result["runs"].items():
        print(f"{name:<45} exit {r['exit']}  losses {' '.join(f'{x:.4f}' for x in r['losses'])}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
