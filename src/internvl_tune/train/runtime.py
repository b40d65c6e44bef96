"""Run-time pieces shared by the training loops: output directory, stop signals, data loaders, memory."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from internvl_tune.data.loading import guarded_loader
from internvl_tune.dist import DistInfo
from internvl_tune.errors import UserError
from internvl_tune.storage import writing
from internvl_tune.train.checkpoint import list_checkpoints

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint at the end of the current step, then a clean exit (128 + the signal).

    The handler only notes the signal, whatever runs at that moment (a step, its compilation, data-loader start-up),
    so the step finishes and is checkpointed. A second signal stops at once, without a checkpoint (the default
    action of that signal). On several ranks the signal may reach them at different steps (or only some of them):
    :meth:`poll` agrees through an all-reduce on a CPU (gloo) group, one step late so that it never waits, and every
    rank stops after the same step.

    An error raised inside the block after a signal came is taken as the signal's doing (it may have ended a child
    the step needed, e.g. one of torch.compile's compile workers, which ignore SIGINT but not SIGTERM): it is kept
    in :attr:`broken` (its type and first line: the exception itself would keep the step's frames, data-loader
    workers included, alive until exit) instead of propagating, and the run ends as a stop without a checkpoint of
    that step.

    Args:
        world_size: ranks of the default process group (all of them must enter and poll together).
    """

    def __init__(self, world_size: int = 1):
        self.signum: int | None = None
        self.broken: str | None = None
        self._old = {}
        self._group = None
        self._pending = None
        self._several = world_size > 1 and dist.is_initialized()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        if self._several:
            self._group = dist.new_group(backend="gloo")
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        for sig, old in self._old.items():  # a second signal: its default action now
            signal.signal(sig, old)
        os.kill(os.getpid(), signum)

    def poll(self) -> bool:
        """Whether to stop after this step; call once per step on every rank."""
        if self._group is None:
            return self.requested
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return stop

    def __exit__(self, kind, error, trace):
        if self._pending is not None and kind is None:
            self._pending[0].wait()
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if isinstance(error, Exception) and not isinstance(error, UserError) and self.requested:
            self.broken = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
            return True
        return False


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
        with writing("the run's files", out):  # a read-only place fails here, before minutes of loading
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        for stale in out.glob("checkpoint-*.partial"):  # a save that a crash interrupted
            shutil.rmtree(stale, ignore_errors=True)
    return out, resume


def memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """In a data-loader worker: leave SIGTERM / SIGINT to the main process.

    Ctrl-C and Slurm signal the whole process group; a worker that died of it would turn the main process's clean
    stop into "DataLoader worker killed by signal" (raised wherever the main process is, e.g. inside compilation).
    The main process ends its workers itself when it stops.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """multiprocessing ends daemon children at exit with SIGTERM and then waits for them without a limit; workers
    that ignore SIGTERM (a data loader still open at exit) would make the process hang there, so kill them first.
    torch's SIGCHLD handler would report each of those kills as "DataLoader worker is killed by signal" with a
    traceback, so it is put back to the default first: at exit, a worker's death is expected."""
    import multiprocessing

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def make_loader(dataset, batches: list[list[int]], collate, workers: int) -> DataLoader:
    """A loader over ``batches`` (lists of dataset indices) that yields ``data.loading.Loaded`` micro-batches.

    Data errors come back as values whatever the number of worker processes (``data/loading.py``), so the caller
    reports the same one-line message with 0 or N workers (``train/skips.py``).
    """
    if workers > 0:
        atexit.unregister(_kill_workers_at_exit)  # once; registered after multiprocessing's, so it runs before it
        atexit.register(_kill_workers_at_exit)
    # A private generator: creating the iterator must not draw from the global RNG (that would shift dropout
    # masks after a resume). Samples are a pure function of (seed, epoch, index), so its seed does not matter.
    return guarded_loader(dataset, batches, collate, workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False, generator=torch.Generator().manual_seed(0),
                          worker_init_fn=ignore_stop_signals if workers > 0 else None)
