"""A data loader whose data errors reach the main process as values, whatever the number of worker processes.

Raised inside a worker, a user's ``DataError`` becomes torch's "Caught DataError in DataLoader worker process 0 ...
Original Traceback" in the main process. :func:`guarded_loader` turns it into a value instead: each item is a
:class:`Loaded` whose ``failure`` holds the error's one-line ``file:line: ... — fix`` message (the line ``data check``
prints for that sample), so the caller reports the same line with 0 or N workers. What the dataset says about its
samples (the ``skipped`` samples it replaced, those it ``truncated``) rides along the same way. Training (``train/runtime.py``,
which counts ``skipped`` against ``--max_skipped_samples``) and ``eval chat`` (``eval/chat/run.py``) load through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch.utils.data import DataLoader, Dataset

from internvl_tune.errors import UserError


class Loaded(NamedTuple):
    """What a guarded loader yields for one batch.

    Attributes:
        batch: the collated batch; None when it could not be built (``failure`` says why).
        skipped: ``SkipRecord`` of each sample the dataset had to replace by the next usable one.
        samples: the samples scheduled for this batch.
        failure: the one-line message of a data error that left no batch.
        truncated: ``Truncation`` of each sample cut to ``--max_seq_length``.
    """

    batch: Any
    skipped: list
    samples: int
    failure: str | None = None
    truncated: tuple = ()


@dataclass(frozen=True)
class _Failed:
    message: str


class _Guarded(Dataset):
    """The dataset as the loader's workers see it: a user's data error becomes a value, handed to the main process
    as its one-line message."""

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
        truncated = tuple(s.pop("truncated") for s in samples if isinstance(s, dict) and "truncated" in s)
        failure = next((s.message for s in samples if isinstance(s, _Failed)), None)
        if failure is None:
            try:
                return Loaded(self.collate(samples), skipped, len(samples), None, truncated)
            except UserError as exc:
                failure = str(exc)
        return Loaded(None, skipped, len(samples), failure, truncated)


def guarded_loader(dataset, batches: list[list[int]], collate: Callable, workers: int, **options) -> DataLoader:
    """A ``DataLoader`` over ``batches`` (lists of dataset indices) that yields :class:`Loaded` items.

    Args:
        collate: turns a list of usable samples into the batch.
        workers: data-loader processes (0: the calling process).
        options: further ``DataLoader`` arguments (``pin_memory``, ``generator``, ``worker_init_fn``, ...).
    """
    return DataLoader(_Guarded(dataset), batch_sampler=batches, collate_fn=_Collate(collate), num_workers=workers,
                      **options)
