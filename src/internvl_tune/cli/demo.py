"""``internvl-tune demo``: the embedded default, end to end on a CPU in a few minutes.

1. writes a tiny InternVL2-1B-layout checkpoint (real Qwen2 tokenizer, random weights);
2. validates the bundled sample (``examples/sample/meta.json``) like ``internvl-tune data check``;
3. fine-tunes it with LoRA (plus the LM head, which a random tiny model needs) on the sample, showing the loss fall,
   with validation and a few generated answers scored at each evaluation (``--eval_generate``);
4. exports the merged model, reloads it, and chats about a sample photo;
5. prints where the run's ``report.html`` is (curves, plan, data, answers beside their images: open it in a browser).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from internvl_tune.cli.flags import add_flag, description

SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "sample"


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=description(__doc__),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "--output_dir", "--out", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--sample", default=str(SAMPLE), help="sample folder with meta.json (default: the bundled one)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: 40)")
    add_flag(parser, "--use_llm_lora", "--lora_rank", dest="lora_rank", type=int, default=16,
             help="LoRA rank of the LLM, as train's flag (default: 16)")
    parser.set_defaults(func=run)


def _meta_with_absolute_paths(sample: Path, out: Path) -> Path:
    """The sample's meta JSON with its relative roots/annotations resolved, so the run works from any directory."""
    from internvl_tune.errors import UserError

    meta_path = sample / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{meta_path} not found — pass --sample FOLDER holding a meta.json")
    meta = json.loads(meta_path.read_text())
    for spec in meta.values():
        for key in ("root", "annotation"):
            if not Path(spec[key]).is_absolute():
                spec[key] = str((sample / spec[key]).resolve())
    path = out / "sample_meta.json"
    path.write_text(json.dumps(meta, indent=2))
    return path


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from internvl_tune.data.config import DataConfig
    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.recipe import ChatRecipe, ModelArgs
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint
    from internvl_tune.train.config import RunConfig, TrainArgs
    from internvl_tune.train.trainer import run as run_trainer

    console = Console()
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sample = Path(args.sample).resolve()
    model_dir = out / "tiny-InternVL2-1B"
    if not (model_dir / "config.json").is_file():
        console.rule("1. a tiny InternVL2-1B-layout checkpoint")
        write_tiny_checkpoint("internvl2-1b", model_dir, seed=0, image_size=56)
    console.print(f"model: {model_dir}")
    meta = _meta_with_absolute_paths(sample, out)

    console.rule("2. data check of the bundled sample")
    from internvl_tune.cli import main as cli_main

    status = cli_main(["data", "check", str(meta), "--model_name_or_path", str(model_dir), "--max_dynamic_patch", "6",
                       "--max_seq_length", "2048", "--show", "2"])
    if status != 0:
        return status

    console.rule(f"3. LoRA fine-tuning ({args.steps} steps, CPU)")
    run_dir = out / "run"
    cfg = RunConfig(
        model=ModelArgs(model_name_or_path=str(model_dir), freeze_backbone=True, freeze_llm=True, freeze_mlp=True,
                        use_llm_lora=args.lora_rank, unfreeze_lm_head=True, grad_checkpoint="False"),
        data=DataConfig(meta_path=str(meta), eval_meta_path=str(meta), max_dynamic_patch=6, max_seq_length=2048),
        train=TrainArgs(output_dir=str(run_dir), overwrite_output_dir=True, max_steps=args.steps,
                        per_device_train_batch_size=4, learning_rate=5e-3, warmup_steps=2, lr_scheduler_type="cosine",
                        logging_steps=5, save_steps=20, save_total_limit=1, dataloader_num_workers=0, seed=0,
                        eval_generate=4, eval_generate_tokens=24),
    )
    result = run_trainer(ChatRecipe(cfg.model, cfg.data), cfg)
    first, last = result.losses[0], result.losses[-1]
    console.print(f"loss {first:.3f} -> {last:.3f} ({(1 - last / first):.0%} lower) over {result.steps} steps")

    console.rule("4. reload the merged model and chat")
    chat = load_pretrained(run_dir)
    from PIL import Image

    photo = sample / "images" / "chelsea.jpg"
    question = "What animal is in the picture?"
    answer = chat.chat(Image.open(photo), question, max_new_tokens=24)
    console.print(f"[bold]user[/bold]: <image {photo.name}> {question}")
    shown = repr(answer) if answer else "(nothing: the tiny model ended its turn at once)"
    console.print(f"[bold]assistant[/bold] (a tiny random model, so expect noise): {shown}")

    console.rule("where things are")
    for what, path in (("run directory", run_dir), ("loss plot", run_dir / "loss.png"),
                       ("metrics", run_dir / "metrics.jsonl"), ("TensorBoard logs", run_dir / "tensorboard"),
                       ("LoRA adapter", run_dir / "adapter"), ("merged model", run_dir / "config.json")):
        if path.exists():  # (no plots without matplotlib, no TensorBoard logs without tensorboard)
            console.print(f"{what:>17}: {path}")
    if (run_dir / "tensorboard").exists():
        console.print(f"view the curves: tensorboard --logdir {run_dir / 'tensorboard'}")
    console.rule("5. the run report (open it in a browser; it needs no network)")
    print(run_dir / "report.html")
    return 0
