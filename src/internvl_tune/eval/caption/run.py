"""The caption evaluation driver: generate on every rank, then write, score and report on rank 0.

Outputs in ``out_dir`` for each dataset (as the reference writes them):
    ``{dataset}_{%y%m%d%H%M%S}.json``          ``[{"image_id": int, "caption": str}, ...]`` in annotation order
    ``{dataset}_{%y%m%d%H%M%S}_scores.json``   the metrics plus what produced them (model, prompt, generation)
and one printed summary line per dataset. InternVL-G runs print ``[dataset, prompt, mean length, dict_items(...)]``
(the line in the InternVL-G README); chat models print ``[checkpoint, dataset, mean length, dict_items(...)]`` and
also append it to ``{out_dir}/{last two parts of the checkpoint path joined by _}.txt``, as internvl_chat does.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from internvl_tune.errors import DataError, UserError
from internvl_tune.eval.caption.datasets import (
    describe_missing,
    get_benchmark,
    load_images,
    load_references,
)
from internvl_tune.eval.caption.generate import CaptionModel, generate_captions
from internvl_tune.eval.caption.metrics import mean_length, require_java, score_captions

LINE_STYLES = ("internvl_g", "internvl_chat")


@dataclass
class CaptionEvalConfig:
    """What to evaluate and where to write it (generation settings live in the captioner)."""

    datasets: Sequence[str]
    data_root: str = "data"
    out_dir: str = "results"
    prompt: str = "English caption:"
    checkpoint: str = ""  # model path, echoed in the outputs
    line_style: str = "internvl_g"
    batch_size: int = 1
    num_workers: int = 2
    limit: int | None = None  # caption only the first N images of each set (smoke runs; scores cover those N)
    generation: dict = field(default_factory=dict)  # recorded in the scores JSON


@dataclass
class CaptionEvalResult:
    """One dataset's outcome on rank 0."""

    dataset: str
    average_length: float
    scores: dict[str, float]
    captions_file: Path
    scores_file: Path
    line: str


def summary_line(style: str, dataset: str, prompt: str, checkpoint: str, average_length: float, scores: dict) -> str:
    """The printed summary, ``str`` of a list ending in ``dict_items`` exactly like the reference prints it."""
    if style == "internvl_g":
        return str([dataset, prompt, average_length, scores.items()])
    return str([checkpoint, dataset, average_length, scores.items()])


def chat_results_txt(out_dir: str | Path, checkpoint: str) -> Path:
    """``pretrained/InternVL2-8B`` -> ``{out_dir}/pretrained_InternVL2-8B.txt`` (the internvl_chat convention)."""
    parts = [p for p in checkpoint.replace(os.sep, "/").split("/") if p]
    return Path(out_dir) / ("_".join(parts[-2:]) + ".txt")


def _check_inputs(name: str, images, references, ground_truth: Path, image_dirs: list[Path]) -> None:
    """Fail before any GPU time is spent: duplicate ids, ids without references, missing image files."""
    counts = Counter(item.image_id for item in images)
    dupes = [i for i, n in counts.items() if n > 1]
    if dupes:
        raise DataError(f"{name}: image id(s) listed more than once: {dupes[:5]}", fix="each image must appear once")
    unknown = [i for i in counts if i not in references]
    if unknown:
        raise DataError(f"{len(unknown)} image id(s) have no reference captions (e.g. {unknown[:5]})",
                        where=str(ground_truth), fix="use the ground-truth file that matches the image list")
    missing = describe_missing([item.path for item in images], image_dirs)
    if missing:
        raise DataError(f"{name}: {missing}", fix="run `internvl-tune data prepare` for the download commands")


def evaluate_dataset(
    model: CaptionModel,
    name: str,
    cfg: CaptionEvalConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[list], list] | None = None,
    print_fn: Callable[[str], None] = print,
) -> CaptionEvalResult | None:
    """Caption one dataset on all ranks; on rank 0 write the files, score, print the line. Other ranks get None."""
    bench = get_benchmark(name)
    images = load_images(bench, cfg.data_root)
    if cfg.limit is not None:
        images = images[: cfg.limit]
    if not images:
        raise DataError(f"{name}: no images to caption", where=str(Path(cfg.data_root) / bench.annotation))
    gt_path = Path(cfg.data_root) / bench.ground_truth
    references = load_references(gt_path)
    _check_inputs(name, images, references, gt_path, bench.image_dirs(cfg.data_root))

    results = generate_captions(
        model, images, batch_size=cfg.batch_size, rank=rank, world_size=world_size, gather=gather,
        num_workers=cfg.num_workers, description=f"{name} captions", show_progress=rank == 0,
    )
    if rank != 0:
        return None

    captions = [c for _, c in results]
    average_length = mean_length(captions)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%y%m%d%H%M%S", time.localtime())
    captions_file = out_dir / f"{name}_{stamp}.json"
    captions_file.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in results]))
    print_fn(f"{name}: {len(results)} captions written to {captions_file}, mean length {average_length:.4f} words")

    # Score the images that were captioned, in ground-truth order: all of them in a full run, as COCOEvalCap does.
    captioned = {i for i, _ in results}
    if len(captioned) < len(references) and cfg.limit is None:
        print_fn(f"warning: {len(references) - len(captioned)} ground-truth image(s) of {name} are not in its image "
                 "list and are left out of the scores")
    refs = {i: r for i, r in references.items() if i in captioned}
    scores = score_captions(refs, dict(results))
    line = summary_line(cfg.line_style, name, cfg.prompt, cfg.checkpoint, average_length, scores)
    print_fn(line)

    scores_file = out_dir / f"{name}_{stamp}_scores.json"
    record = {
        "dataset": name, "model": cfg.checkpoint, "prompt": cfg.prompt, "num_images": len(results),
        "average_length": average_length, "metrics": scores, "captions_file": captions_file.name,
        "generation": cfg.generation, "world_size": world_size, "limit": cfg.limit,
    }
    scores_file.write_text(json.dumps(record, indent=2) + "\n")
    if cfg.line_style == "internvl_chat":
        with open(chat_results_txt(out_dir, cfg.checkpoint), "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return CaptionEvalResult(name, average_length, scores, captions_file, scores_file, line)


def evaluate_captions(
    model: CaptionModel,
    cfg: CaptionEvalConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[list], list] | None = None,
    print_fn: Callable[[str], None] = print,
) -> list[CaptionEvalResult]:
    """Evaluate every dataset of ``cfg.datasets`` in turn; rank 0 returns the results, other ranks an empty list.

    Checks Java up front (on every rank, so no rank spends hours generating before rank 0 finds it missing).
    """
    if cfg.line_style not in LINE_STYLES:
        raise ValueError(f"line_style must be one of {LINE_STYLES}")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit must be at least 1, got {cfg.limit}")
    require_java()
    out = []
    for name in cfg.datasets:
        result = evaluate_dataset(model, name, cfg, rank=rank, world_size=world_size, gather=gather, print_fn=print_fn)
        if result is not None:
            out.append(result)
    if rank == 0 and len(out) > 1:
        for result in out:
            print_fn(result.line)
    if rank == 0 and cfg.line_style == "internvl_chat" and out:
        print_fn(f"results appended to {chat_results_txt(cfg.out_dir, cfg.checkpoint)}")
    return out
