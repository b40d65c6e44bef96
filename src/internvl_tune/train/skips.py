"""Samples a run could not use: counted over data-loader workers and ranks, held to ``--max_skipped_samples``, and
written down (``train.log``, ``skipped_samples.jsonl``, the count in ``train_results.json``).

The dataset replaces an unusable sample by the next usable one and hands a ``SkipRecord`` (sample, ``file:line``,
reason) along with the batch, from whichever worker process built it (``runtime.make_loader`` over
``data/loading.py``). Before each step every rank gives this ledger the records of its micro-batches; one all-reduce
over a CPU (gloo) group sums them, so every rank takes the same decision at the same step without waiting for the GPU, and when there is something to
report the records themselves are gathered to rank 0, which writes them. A data error that left no batch at all
stops every rank the same way. Skips depend only on the data, so a resumed run meets them again at the same steps:
the file keeps the lines up to the resumed step, and the counters come back from the checkpoint.

Training samples cut to ``--max_seq_length`` (``data.dataset.Truncation``: the tail is not trained on; ``data
check`` warns of each) are counted in the same all-reduce (``truncated_samples`` in ``train_results.json``); the
first :data:`NAMED_TRUNCATIONS` are named in a notice on the console and in ``train.log``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from internvl_tune.dist import DistInfo
from internvl_tune.errors import UserError

SKIPPED_FILE = "skipped_samples.jsonl"
CONSOLE_LINES = 20  # skipped samples shown on the console; every one goes to train.log and skipped_samples.jsonl
NAMED_TRUNCATIONS = 5  # truncated samples named in a notice; all are counted


def parse_limit(text) -> tuple[int | None, float | None]:
    """``--max_skipped_samples``: ``(count, None)`` for a whole number, ``(None, fraction)`` for one in (0, 1)."""
    try:
        number = float(str(text).strip())
    except ValueError:
        number = math.nan
    if math.isfinite(number) and number >= 0 and number == int(number):
        return int(number), None
    if 0 < number < 1:
        return None, number
    raise UserError(f"--max_skipped_samples {text!r}: give a count of samples (0, 25, ...) or a fraction of the "
                    "samples seen below 1 (0.01 = 1 %)")


class SkipLedger:
    """Counts and records skipped samples and stops the run past the limit (see the module docstring).

    Args:
        limit: the ``--max_skipped_samples`` value.
        output_dir: the run directory (``skipped_samples.jsonl`` and ``train.log`` live there).
        info: this process's place in the job.
        meta_path: the meta JSON, for the ``data check`` hint (None: not a meta-JSON recipe).
        resume_step: the step a resumed run continues from (records of later steps are dropped), None for a fresh run.
        state: the ``state()`` saved in the checkpoint resumed from.
    """

    def __init__(self, limit, output_dir: Path, info: DistInfo, meta_path: str | None = None,
                 resume_step: int | None = None, state: dict | None = None):
        self.max_count, self.fraction = parse_limit(limit)
        self.limit_text = str(limit)
        self.info, self.meta_path = info, meta_path
        self.path, self.log_path = Path(output_dir) / SKIPPED_FILE, Path(output_dir) / "train.log"
        self.count = int((state or {}).get("count", 0))
        self.seen = int((state or {}).get("seen", 0))
        self.truncated = int((state or {}).get("truncated", 0))
        self.named = int((state or {}).get("named", 0))  # truncated samples named so far
        self.say = print  # the trainer points this at its progress printer (console + train.log)
        # host-side collectives: summing a few counters must not wait for the GPU's queued work
        self.group = dist.new_group(backend="gloo") if info.world_size > 1 else None
        if info.is_main:
            self._keep_until(resume_step)

    def describe(self) -> str:
        """The plan line of the policy."""
        if self.fraction is not None:
            policy = f"skipped (replaced by the next usable one) while at most {self.fraction:g} of the samples seen"
        elif self.max_count:
            policy = f"skipped (replaced by the next usable one), at most {self.max_count}"
        else:
            policy = "stop the run at the first one"
        return f"unusable samples: {policy} (--max_skipped_samples {self.limit_text})"

    def state(self) -> dict:
        """What a checkpoint keeps so that a resumed run goes on counting."""
        return {"count": self.count, "seen": self.seen, "truncated": self.truncated, "named": self.named}

    def take(self, loaded: list, step: int, split: str = "train", counted: bool = True) -> list:
        """The batches of ``loaded`` (``data.loading.Loaded``), after accounting for their skipped samples on every rank.

        Every rank must call this for the same steps. ``counted=False`` (a batch a rank repeats to keep in step with
        the others) only joins the collective.

        Raises:
            UserError: on every rank at once, when a batch could not be built at all or the skips pass the limit.
        """
        skipped = [r for item in loaded for r in item.skipped] if counted else []
        samples = sum(item.samples for item in loaded) if counted else 0
        failure = next((item.failure for item in loaded if item.failure), None)
        cut = [r for item in loaded for r in item.truncated] if counted and split == "train" else []
        new, seen, failed, truncated = self._sum([len(skipped), samples, int(failure is not None), len(cut)])
        self.seen += seen
        if truncated:
            self._note_truncated(cut, truncated, step)
        if not (new or failed):
            return [item.batch for item in loaded]
        records, failures = self._gather(skipped, failure)
        self.count += new
        stop = failures[0] if failures else self._over_limit(records)
        if self.info.is_main:  # when the run stops, the error itself tells the console
            self._write(records, step, split, console=not stop)
            if stop:
                self._log(f"step {step}: error: {stop}")
        if stop:
            raise UserError(stop)
        return [item.batch for item in loaded]

    def _note_truncated(self, cut: list, total: int, step: int) -> None:
        """Count this step's truncated samples (``total`` over ranks) and name the first few (rank 0)."""
        self.truncated += total
        if self.named >= NAMED_TRUNCATIONS:
            return
        records = cut if self.group is None else self._gather(cut, None)[0]
        for r in records[: NAMED_TRUNCATIONS - self.named]:
            self.named += 1
            if self.info.is_main:
                self.say(f"notice: step {step}: sample {r.sample_id} cut to --max_seq_length, its tail is not trained "
                         f"on: {r}")
                if self.named == NAMED_TRUNCATIONS:
                    self.say("further truncated samples are only counted (truncated_samples in train_results.json); "
                             f"`internvl-tune data check {self.meta_path or 'META_JSON'}` warns of each")

    # ------------------------------------------------------------------ policy
    def _over_limit(self, records: list) -> str | None:
        meta = self.meta_path or "META_JSON"
        if self.max_count == 0:
            first = records[0]
            why = (f"the file could not be read during training; `internvl-tune data check {meta}` reads every file "
                   "(if it passed, the file has changed since)" if first.media else
                   f"training stops at the first unusable sample; `internvl-tune data check {meta}` lists them all")
            return f"{first} [{why}; --max_skipped_samples N, or a fraction such as 0.01, skips such samples instead]"
        allowed = self.max_count if self.fraction is None else math.ceil(self.fraction * self.seen)
        if self.count <= allowed:
            return None
        share = f"of the {self.seen} seen so far " if self.fraction is not None else ""
        return (f"{self.count} samples {share}could not be used, more than --max_skipped_samples {self.limit_text} "
                f"allows (the last: {records[-1]}); they are listed in {self.path} — fix them (`internvl-tune data "
                f"check {meta}` finds them all) or raise --max_skipped_samples")

    # ------------------------------------------------------------------ collectives
    def _sum(self, values: list[int]) -> list[int]:
        totals = torch.tensor(values, dtype=torch.int64)
        if self.group is not None:
            dist.all_reduce(totals, group=self.group)
        return totals.tolist()

    def _gather(self, skipped: list, failure: str | None) -> tuple[list, list[str]]:
        """Every rank's records and failures, in rank order."""
        if self.group is None:
            return list(skipped), [failure] if failure else []
        boxes: list = [None] * self.info.world_size
        dist.all_gather_object(boxes, (skipped, failure), group=self.group)
        return [r for records, _ in boxes for r in records], [f for _, f in boxes if f]

    # ------------------------------------------------------------------ files (rank 0)
    def _write(self, records: list, step: int, split: str, console: bool = True) -> None:
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({"step": step, "split": split, "sample_id": r.sample_id, "where": r.where,
                                    "reason": r.message, "fix": r.fix, "media": r.media}, ensure_ascii=False) + "\n")
        first = self.count - len(records)  # how many were reported before these
        for k, r in enumerate(records, start=first + 1):
            line = f"step {step}: skipped {split} sample {r.sample_id} ({k} so far): {r}"
            if console and k <= CONSOLE_LINES:
                self.say(line)  # console and train.log
                if k == CONSOLE_LINES:
                    self.say(f"further skipped samples are listed in {self.log_path} and {self.path} only")
            else:
                self._log(line)

    def _log(self, line: str) -> None:
        """A line for train.log only."""
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(line + "\n")

    def _keep_until(self, step: int | None) -> None:
        """A fresh run starts an empty list; a resumed one keeps the records of the steps it does not redo."""
        if step is None or not self.path.exists():
            self.path.unlink(missing_ok=True)
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
        partial = self.path.with_suffix(".jsonl.partial")
        partial.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(partial, self.path)


def _step_of(line: str) -> float:
    """The step of a record line; a line torn by a crash (only ever the last, of a step after the checkpoint) sorts
    after every step, so it is dropped with the steps the resumed run redoes."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
