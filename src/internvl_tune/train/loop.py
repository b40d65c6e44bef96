"""The training loop both trainers share: epochs, resume position, logging, checkpoints, stop signals.

A trainer subclasses :class:`LoopTrainer`, builds its model, data and optimizer in ``__init__`` and implements
``train_step`` (one optimizer step), ``log_fields`` / ``status`` (what to log and show), ``plan_lines`` (the plan
printed before the first step) and ``export`` (the final model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from internvl_tune.errors import UserError
from internvl_tune.train.checkpoint import Checkpointer
from internvl_tune.train.config import save_config
from internvl_tune.train.metrics import MetricsLogger
from internvl_tune.train.optim import build_adamw
from internvl_tune.train.progress import StepProgress
from internvl_tune.train.runtime import StopFlag, make_loader, memory_gib
from internvl_tune.train.schedule import LRSchedule, warmup_steps_for


@dataclass
class TrainResult:
    """What a finished (or interrupted) run leaves behind."""

    output_dir: Path
    steps: int
    losses: list[float]
    interrupted: bool = False


class LoopTrainer:
    """Base of the chat and retrieval trainers.

    Subclasses set in ``__init__``: ``cfg`` (with a ``train`` section), ``info``, ``module``, ``train_set``,
    ``sampler``, ``collate``, ``total_steps`` and ``output_dir``, then call :meth:`start_run`, which adds the
    optimizer, schedule, checkpointer, metrics, resume state and the counters ``step``, ``bad_steps``, ``seen``.
    """

    name = "train"  # progress-bar label
    unit = "tokens"  # what ``train_step`` counts as work: logged as ``<unit>_per_s``, saved as ``<unit>_seen``

    # ------------------------------------------------------------------ subclass hooks
    def train_step(self, micro_batches: list):
        """One optimizer step: a dict with at least ``loss``, ``lr``, ``grad_norm``, ``finite`` and ``work``, or
        an object whose ``result()`` returns that dict later (a step still running on the GPU)."""
        raise NotImplementedError

    def sync_due(self) -> bool:
        """True when ``after_step`` will act at the current step (it then sees every step's numbers logged)."""
        return False

    def log_fields(self, out: dict) -> dict:
        """Values of a step's output to put in the metrics row (besides epoch, rate, memory, skipped steps)."""
        return {k: out[k] for k in ("loss", "lr", "grad_norm")}

    def status(self, out: dict, row: dict) -> str:
        """The progress-bar text after a logged step."""
        return f"loss {out['loss']:.4f} | {row[f'{self.unit}_per_s']:.0f} {self.unit}/s | {row['memory_gib']:.1f} GiB"

    def after_step(self, progress: StepProgress) -> None:
        """Called after every step (validation hooks)."""

    def plan_lines(self) -> list[str]:
        """Lines describing the run, printed before the first step."""
        return []

    def export(self) -> Path:
        """Write the final model."""
        raise NotImplementedError

    # ------------------------------------------------------------------ set-up shared by the trainers
    def start_run(self, groups: list[dict], resume: str | None) -> None:
        """Optimizer, schedule, checkpointer, resume state and metrics; call once the module and sampler exist.

        Args:
            groups: parameter groups from ``optim.build_param_groups``.
            resume: ``--resume_from_checkpoint`` (a path, ``"auto"`` or None).
        """
        t, info = self.cfg.train, self.info
        self.optimizer = build_adamw(groups, (t.adam_beta1, t.adam_beta2), t.adam_epsilon)
        warmup = warmup_steps_for(self.total_steps, t.warmup_steps, t.warmup_ratio)
        self.schedule = LRSchedule(t.lr_scheduler_type, warmup, self.total_steps)
        self.checkpointer = Checkpointer(self.output_dir, info, t.save_total_limit)
        self.step, self.bad_steps, self.seen = 0, 0, 0
        self.resumed_from = self.checkpointer.resolve(resume)
        if self.resumed_from is not None:
            state = self.checkpointer.load(self.resumed_from, self.module, self.optimizer)
            self.step, self.bad_steps, self.seen = state["step"], state["bad_steps"], state[f"{self.unit}_seen"]
        self.metrics = MetricsLogger(self.output_dir, enabled=info.is_main, tensorboard=t.report_to == "tensorboard",
                                     resume_step=self.step + 1 if self.resumed_from is not None else None)
        if info.is_main:
            save_config(self.cfg, self.output_dir / "config.yaml")

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Run until ``total_steps`` (or a stop signal), checkpointing and logging on the way."""
        t, info = self.cfg.train, self.info
        progress = StepProgress(self.total_steps, self.name, enabled=info.is_main, start=self.step)
        self._print_plan(progress)
        self._losses: list[float] = []
        interrupted = False
        self.module.train()
        steps_per_epoch = self.sampler.steps_per_epoch
        self._window = [time.perf_counter(), 0]  # start time and work of the current logging window
        with StopFlag() as stop:
            while self.step < self.total_steps and not interrupted:
                epoch, in_epoch = divmod(self.step, steps_per_epoch)
                if hasattr(self.train_set, "set_epoch"):
                    self.train_set.set_epoch(epoch)
                order = list(self.sampler.epoch_steps(epoch, in_epoch))[: self.total_steps - self.step]
                micro = [mb for _, micros in order for mb in micros]
                loader = iter(make_loader(self.train_set, micro, self.collate, t.dataloader_num_workers))
                pending = None  # the previous step, queued and not read back yet
                for i in range(len(order)):
                    handle = self.train_step([next(loader) for _ in range(t.gradient_accumulation_steps)])
                    if isinstance(handle, dict):  # a step that returned its numbers has finished
                        handle.setdefault("done_at", time.perf_counter())
                    self.step += 1
                    if pending is not None:  # read step n - 1 while step n runs
                        self._record(*pending, progress)
                    pending = (self.step, handle)
                    saving = t.save_strategy == "steps" and self.due(t.save_steps)
                    stopping = stop.requested
                    if saving or stopping or self.sync_due() or i == len(order) - 1:
                        self._record(*pending, progress)
                        pending = None
                    self.after_step(progress)
                    if saving:
                        self.save_checkpoint()
                    if stopping:
                        interrupted = True
                        break
                if t.save_strategy == "epoch" and not interrupted:
                    self.save_checkpoint()
        progress.close()
        if interrupted:
            self.save_checkpoint()
            if info.is_main:
                print(f"stopped by signal at step {self.step}; resume with --resume_from_checkpoint auto")
        self.metrics.close()
        return TrainResult(self.output_dir, self.step, self._losses, interrupted)

    def _record(self, step: int, handle, progress: StepProgress) -> None:
        """Account for a finished step: counters, the non-finite limit, the metrics row and the progress bar."""
        t = self.cfg.train
        out = handle.result() if hasattr(handle, "result") else handle
        self.seen += out["work"]
        self._window[1] += out["work"]
        self._losses.append(out["loss"])
        if not out["finite"]:
            self.bad_steps += 1
        if self.bad_steps > t.max_bad_steps:
            raise UserError(
                f"{self.bad_steps} steps had a non-finite loss or gradient (last at step {step}); lower "
                f"--learning_rate, check the data with `internvl-tune data check`, or raise --max_bad_steps"
            )
        if step % t.logging_steps == 0 or step == self.total_steps:
            done_at = out["done_at"]  # steps read back late know when they finished
            elapsed = done_at - self._window[0]
            row = {"epoch": round(step / self.sampler.steps_per_epoch, 4), **self.log_fields(out),
                   f"{self.unit}_per_s": self._window[1] / max(elapsed, 1e-9),
                   "memory_gib": round(memory_gib(self.info.device), 2), "skipped_steps": self.bad_steps}
            self.metrics.log(step, row)
            progress.update(step, self.status(out, row), log=True)
            self._window = [done_at, 0]

    def due(self, every: int) -> bool:
        """True when the current step is a multiple of ``every`` (> 0)."""
        return every > 0 and self.step % every == 0

    def save_checkpoint(self) -> Path:
        path = self.checkpointer.save(self.step, self.module, self.optimizer,
                                      {"bad_steps": self.bad_steps, f"{self.unit}_seen": self.seen})
        self.metrics.flush()
        return path

    def describe(self) -> None:
        """Dry run: print the plan without training."""
        progress = StepProgress(self.total_steps, self.name, enabled=self.info.is_main)
        self._print_plan(progress)
        progress.close()

    def _print_plan(self, progress: StepProgress) -> None:
        if not self.info.is_main:
            return
        lines = self.plan_lines()
        if self.resumed_from is not None:
            lines.append(f"resumed from {self.resumed_from} at step {self.step}")
        for line in lines:
            progress.print(line)


def run_trainer(trainer_cls, cfg) -> TrainResult:
    """Build ``trainer_cls(cfg)``, train (or describe, with ``--dry_run``), export, tear down the process group."""
    from internvl_tune.dist import shutdown

    try:
        trainer = trainer_cls(cfg)
        if cfg.train.dry_run:
            trainer.describe()
            return TrainResult(trainer.output_dir, trainer.step, [])
        result = trainer.train()
        if not result.interrupted:
            trainer.export()
        return result
    finally:
        shutdown()
