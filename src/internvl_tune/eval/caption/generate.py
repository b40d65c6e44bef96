"""Batched caption generation over a test set, sharded across ranks and gathered back in file order.

Each rank takes one contiguous slice of the image list (the first ``len % world_size`` ranks get one extra image,
as the reference's InferenceSampler does), so concatenating the per-rank results in rank order restores the file
order and 2 ranks write exactly what 1 rank writes. Images are decoded by a small thread pool one batch ahead of the
model.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from internvl_tune.errors import DataError, UserError
from internvl_tune.eval.caption.datasets import CaptionImage
from internvl_tune.eval.sharding import shard_range


class CaptionModel(Protocol):
    """Anything that turns a batch of RGB images into one caption each (same order)."""

    def caption(self, images: list[Image.Image]) -> list[str]: ...


def load_image(path) -> Image.Image:
    """Open an image as RGB, turning a missing or unreadable file into a DataError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError("image not found", where=str(path),
                        fix="run `internvl-tune data prepare` to check the dataset layout") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image: {exc}", where=str(path)) from None


def _batches(items: Sequence[CaptionImage], batch_size: int, workers: int) -> Iterator[tuple[list, list]]:
    """Yield ``(items, decoded images)`` per batch, decoding up to two batches ahead in threads."""
    starts = range(0, len(items), batch_size)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        for start in starts:
            chunk = list(items[start : start + batch_size])
            pending.append((chunk, [pool.submit(load_image, x.path) for x in chunk]))
            if len(pending) > 2:
                chunk, futures = pending.popleft()
                yield chunk, [f.result() for f in futures]
        while pending:
            chunk, futures = pending.popleft()
            yield chunk, [f.result() for f in futures]


class EvalProgress:
    """A rich bar with ETA on a terminal; a plain line every ~10 % in logs (Slurm, CI). ``unit`` names what is counted."""

    def __init__(self, total: int, description: str, enabled: bool, unit: str = "images"):
        self.total, self.description, self.done, self.unit = total, description, 0, unit
        self.enabled = enabled and total > 0
        self.start = time.monotonic()
        self.next_log = 0.1
        self.bar = None
        if self.enabled and Console(stderr=True).is_terminal:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.task = self.bar.add_task(description, total=total)
            self.bar.start()

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif self.enabled and self.done / self.total >= self.next_log:
            elapsed = time.monotonic() - self.start
            eta = elapsed / self.done * (self.total - self.done)
            print(f"{self.description}: {self.done}/{self.total} {self.unit}, {elapsed:.0f}s elapsed, eta {eta:.0f}s",
                  file=sys.stderr, flush=True)
            self.next_log = self.done / self.total + 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def generate_captions(
    model: CaptionModel,
    images: Sequence[CaptionImage],
    *,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[list], list] | None = None,
    num_workers: int = 2,
    description: str = "captioning",
    show_progress: bool = True,
) -> list[tuple[int, str]]:
    """Caption every image of ``images`` across ranks and return ``[(image_id, caption), ...]`` in file order.

    Args:
        model: the captioner.
        images: the whole test set (every rank passes the same list).
        batch_size: images per ``model.caption`` call.
        rank, world_size: this process's place; rank ``r`` captions ``shard_range(len(images), r, world_size)``.
        gather: concatenates a per-rank list over ranks in rank order on every rank (``all_gather_object``);
            required when ``world_size > 1``.
        num_workers: threads decoding images ahead of the model.
        description: progress-bar label.
        show_progress: draw progress (the caller passes False on all but rank 0).
    """
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if world_size > 1 and gather is None:
        raise ValueError("generate_captions needs a gather function when world_size > 1")
    shard = [images[i] for i in shard_range(len(images), rank, world_size)]
    progress = EvalProgress(len(shard), description, show_progress)
    local: list[tuple[int, str]] = []
    try:
        for chunk, pil_images in _batches(shard, batch_size, num_workers):
            captions = model.caption(pil_images)
            if len(captions) != len(chunk):
                raise RuntimeError(f"the captioner returned {len(captions)} captions for {len(chunk)} images")
            local.extend((item.image_id, text) for item, text in zip(chunk, captions))
            progress.advance(len(chunk))
    finally:
        progress.close()
    merged = gather(local) if gather is not None else local
    return [(int(i), str(c)) for i, c in merged]
