"""Run-time pieces shared by the training loops: output directory, stop signals, data loaders, memory."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from internvl_tune.dist import DistInfo
from internvl_tune.errors import UserError
from internvl_tune.train.checkpoint import list_checkpoints


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint at the end of the current step, then a clean exit."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def prepare_output_dir(t, info: DistInfo) -> tuple[Path, str | None]:
    """The run directory (created on rank 0, interrupted saves removed) and the resume request.

    Args:
        t: the run's ``TrainArgs`` (``output_dir``, ``resume_from_checkpoint``, ``overwrite_output_dir``).
    """
    out = Path(t.output_dir)
    resume = t.resume_from_checkpoint
    existing = list_checkpoints(out)
    if existing and not resume and not t.overwrite_output_dir:
        raise UserError(
            f"{out} already holds checkpoints ({existing[-1].name}); pass --resume_from_checkpoint auto to continue, "
            f"or --overwrite_output_dir True to start over"
        )
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("checkpoint-*.partial"):  # a save that a crash interrupted
            shutil.rmtree(stale, ignore_errors=True)
    return out, resume


def memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def make_loader(dataset, batches: list[list[int]], collate, workers: int) -> DataLoader:
    # A private generator: creating the iterator must not draw from the global RNG (that would shift dropout
    # masks after a resume). Samples are a pure function of (seed, epoch, index), so its seed does not matter.
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      generator=torch.Generator().manual_seed(0))
