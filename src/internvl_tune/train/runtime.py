"""Run-time pieces shared by the training loops: output directory, stop signals, data loaders, memory."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

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


class Loaded(NamedTuple):
    """What the training data loader yields for one micro-batch.

    Attributes:
        batch: the collated batch; None when it could not be built (``failure`` says why).
        skipped: ``SkipRecord`` of each sample the dataset had to replace by the next usable one.
        samples: the samples scheduled for this batch.
        failure: the one-line message of a data error that left no batch.
    """

    batch: Any
    skipped: list
    samples: int
    failure: str | None = None


@dataclass(frozen=True)
class _Failed:
    message: str


class _Guarded(Dataset):
    """The dataset as the loader's workers see it: a user's data error becomes a value, handed to the main process
    as its one-line message (raised there, it would become the DataLoader's "Caught DataError in DataLoader worker
    process 0 ... Original Traceback")."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except UserError as exc:
            return _Failed(str(exc))


@dataclass(frozen=True)
class _Collate:
    """Collate the usable samples and pass on what the dataset reported about the batch (:class:`Loaded`)."""

    collate: Callable

    def __call__(self, samples: list) -> Loaded:
        skipped = [r for s in samples if isinstance(s, dict) for r in s.pop("skipped", ())]
        failure = next((s.message for s in samples if isinstance(s, _Failed)), None)
        if failure is None:
            try:
                return Loaded(self.collate(samples), skipped, len(samples))
            except UserError as exc:
                failure = str(exc)
        return Loaded(None, skipped, len(samples), failure)


def make_loader(dataset, batches: list[list[int]], collate, workers: int) -> DataLoader:
    """A loader over ``batches`` (lists of dataset indices) that yields :class:`Loaded` micro-batches.

    Data errors come back as values whatever the number of worker processes, so the caller reports the same one-line
    message with 0 or N workers (``train/skips.py``).
    """
    # A private generator: creating the iterator must not draw from the global RNG (that would shift dropout
    # masks after a resume). Samples are a pure function of (seed, epoch, index), so its seed does not matter.
    return DataLoader(_Guarded(dataset), batch_sampler=batches, collate_fn=_Collate(collate), num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      generator=torch.Generator().manual_seed(0))
