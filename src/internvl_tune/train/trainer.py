"""The one trainer: set-up, the loop, validation and export, for every model family through its recipe.

Launch: ``internvl-tune train ...`` / ``internvl-tune retrieval-train ...`` (one process), or under ``torchrun`` /
``srun`` (N ranks; gloo on CPU, NCCL on GPUs). What differs between model families lives in their recipe
(``models/internvl_chat/recipe.py``, ``models/internvl_cg/recipe.py``), which subclasses
``models.common.recipe.Recipe``: its optional hooks (run state, a per-step ``prepare_step``) are called here.

Set-up order: process group -> output dir -> the training module from the recipe (on several ranks: its structure on
the meta device) -> fp32 master copies of what trains -> data (the memory estimate needs its lengths) -> the
checkpointing mode (``auto`` resolved from the estimate) -> ``dist.parallelize`` (activation checkpointing, compile,
FSDP2) -> on several ranks rank 0 reads the checkpoint and broadcasts it into the shards -> optimizer, schedule,
checkpoints, metrics -> resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from internvl_tune.dist import all_gather_object_ordered, all_reduce_sum, barrier, init_distributed, shutdown
from internvl_tune.dist.parallelize import (
    clean_name,
    compile_enabled,
    materialize_from_rank0,
    move_to_device,
    parallelize,
    parse_grad_checkpoint,
    reshard,
)
from internvl_tune.errors import StorageError, UserError
from internvl_tune.models.common.checkpoint_files import read_state
from internvl_tune.models.common.recipe import Recipe, StepContext
from internvl_tune.report.run import DATA_SUMMARY, PREDICTIONS_DIR
from internvl_tune.storage import writing
from internvl_tune.train.checkpoint import Checkpointer
from internvl_tune.train.config import RunConfig, save_config
from internvl_tune.train.deepspeed import translate as translate_deepspeed
from internvl_tune.train.memory import choose_grad_checkpoint, estimate_training_memory
from internvl_tune.train.metrics import MetricsLogger, parse_report_to
from internvl_tune.train.optim import build_adamw, build_param_groups, count_parameters, fp32_master_weights
from internvl_tune.train.progress import StepProgress
from internvl_tune.train.runtime import StopFlag, make_loader, memory_gib, prepare_output_dir
from internvl_tune.train.schedule import LRSchedule, warmup_steps_for
from internvl_tune.train.skips import NAMED_TRUNCATIONS, SkipLedger
from internvl_tune.train.step import StepRunner

TEXT_LOG = "train.log"
RESULTS = "train_results.json"
WARMUP_STEPS = 2  # steps of each process left out of the steady-state throughput (compilation, allocator, workers)


@dataclass
class TrainResult:
    """What a finished (or interrupted) run leaves behind."""

    output_dir: Path
    steps: int
    losses: list[float]
    interrupted: bool = False
    signal: int | None = None  # the stop signal of an interrupted run (the CLI exits with 128 + it)
    already_finished: bool = False  # a re-run of a finished run: nothing was done

    @property
    def exit_status(self) -> int:
        """0, or 128 + the signal after a clean stop (130 Ctrl-C, 143 SIGTERM), as a shell reports a process the
        signal ended: ``train && merge-lora`` must not go on after an interrupted run."""
        return 128 + self.signal if self.signal else 0


class AlreadyFinished(Exception):
    """Raised during set-up when ``--resume_from_checkpoint auto`` meets a run that finished with the same
    schedule: nothing is loaded, trained, exported or rewritten."""

    def __init__(self, step: int, is_main: bool):
        super().__init__(step)
        self.step, self.is_main = step, is_main


class Trainer:
    """Holds the state of one run; :meth:`train` is the loop."""

    def __init__(self, recipe: Recipe, cfg: RunConfig):
        self.recipe, self.cfg = recipe, cfg
        t = cfg.train
        self.sinks = parse_report_to(t.report_to)  # an unknown sink fails before minutes of loading
        # --deepspeed: its flag values are in cfg.train already (train/config.py); here its sharding and offload
        self.deepspeed = translate_deepspeed(t.deepspeed) if t.deepspeed else None
        offload = self.deepspeed is not None and self.deepspeed.offload
        self.info = info = init_distributed(t.device, cpu_collectives=offload)
        if offload and info.device.type != "cuda":  # nothing to pin without a GPU
            self.deepspeed = dataclasses.replace(self.deepspeed, pin_memory=False)
        self.output_dir, resume = prepare_output_dir(t, info)
        if resume == "auto":
            finished = _finished_step(self.output_dir, _schedule(t, info.world_size))
            if finished is not None:
                raise AlreadyFinished(finished, info.is_main)
        self.compute_dtype = torch.bfloat16 if (t.bf16 and info.device.type == "cuda") else None
        load_dtype = torch.bfloat16 if self.compute_dtype is not None else torch.float32

        # Several ranks: each builds the structure only; rank 0 alone reads the checkpoint and broadcasts it into
        # the shards (one full copy in host memory for the whole job, not one per rank).
        sharded = info.world_size > 1
        torch.manual_seed(t.seed)  # the same LoRA initialisation on every rank and for any world size
        module = recipe.build_module(load_dtype, weights=not sharded, device=info.device)
        fp32_master_weights(module)
        self.trainable, self.total_params = count_parameters(module)
        if self.trainable == 0:
            raise UserError("no parameter is trainable: check the freeze / unfreeze / LoRA flags")
        if not sharded:  # (offloaded trainable parameters stay on the CPU, where FSDP2 keeps them)
            move_to_device(module, info.device, keep_on_cpu=lambda p: offload and p.requires_grad)
        self.module = module
        self.compiled = compile_enabled(t.torch_compile, info.device)
        # the data first: the memory estimate (and so --grad_checkpoint auto) needs the samples' lengths
        self.train_set, self.val_set, self.collate, self.sampler = recipe.build_data(
            t.seed, info.rank, info.world_size, t.per_device_train_batch_size, t.gradient_accumulation_steps)
        if t.eval_generate and self.val_set is None:
            raise UserError(f"--eval_generate {t.eval_generate} answers validation samples at each evaluation: add "
                            "--eval_meta_path VAL.json (a meta JSON of held-out samples)")
        self.grad_checkpoint, self.grad_checkpoint_note = self._resolve_grad_checkpoint(
            parse_grad_checkpoint(recipe.grad_checkpoint))
        parallelize(module, module.blocks(), world_size=info.world_size, param_dtype=self.compute_dtype,
                    grad_checkpoint=self.grad_checkpoint, compile=self.compiled, **self._sharding())
        if sharded:
            full = {}
            if info.is_main:
                torch.manual_seed(t.seed)
                source = recipe.build_module(load_dtype)
                fp32_master_weights(source)
                full = source.state_dict()
            materialize_from_rank0(module, full, info.device, info.is_main, cpu_offload=offload)
            del full

        steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))
        self.groups = build_param_groups(((clean_name(n), p) for n, p in module.named_parameters()),
                                         t.learning_rate, t.weight_decay, recipe.param_groups_scale())
        self.optimizer = build_adamw(self.groups, (t.adam_beta1, t.adam_beta2), t.adam_epsilon)
        warmup = warmup_steps_for(self.total_steps, t.warmup_steps, t.warmup_ratio)
        self.schedule = LRSchedule(t.lr_scheduler_type, warmup, self.total_steps)
        self.checkpointer = Checkpointer(self.output_dir, info, t.save_total_limit)
        self.step, self.bad_steps, self.seen = 0, 0, 0
        self.resumed_from = self.checkpointer.resolve(resume)
        state = {}
        if self.resumed_from is not None:
            self._check_global_batch(read_state(self.resumed_from))
            state = self.checkpointer.load(self.resumed_from, self.optimizer)
            seen = state.get("work_seen", state.get(f"{recipe.unit}_seen", 0))  # (the older name of the counter)
            self.step, self.bad_steps, self.seen = state["step"], state["bad_steps"], seen
            recipe.load_run_state(state.get("module", {}))  # e.g. a running mean, a rollout
        elif info.is_main:
            (self.output_dir / TEXT_LOG).unlink(missing_ok=True)
        self.skips = SkipLedger(t.max_skipped_samples, self.output_dir, info, getattr(cfg.data, "meta_path", None),
                                self.step if self.resumed_from is not None else None, state.get("skipped_samples"))
        self.metrics = MetricsLogger(self.output_dir, enabled=info.is_main, sinks=self.sinks, run_name=t.run_name,
                                     resume_step=self.step + 1 if self.resumed_from is not None else None,
                                     config=cfg.to_dict())
        if info.is_main:
            save_config(cfg, self.output_dir / "config.yaml")
            (self.output_dir / DATA_SUMMARY).write_text(json.dumps(recipe.data_summary(), ensure_ascii=False) + "\n")
        self.stepper = StepRunner(self.module, self.optimizer, self.schedule, info, t.max_grad_norm)

    def _sharding(self) -> dict:
        """FSDP2's resharding and offload settings (``parallelize``): a ``--deepspeed`` file's, or ZeRO-3's."""
        ds = self.deepspeed
        if ds is None:
            return {"reshard_after_forward": True, "cpu_offload": False}
        return {"reshard_after_forward": ds.reshard_after_forward, "cpu_offload": ds.offload,
                "pin_memory": ds.pin_memory}

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Run until ``total_steps`` (or a stop signal), checkpointing, validating and logging on the way."""
        t, info = self.cfg.train, self.info
        progress = self.progress = StepProgress(self.total_steps, self.recipe.name, enabled=info.is_main,
                                                start=self.step, log_path=self.output_dir / TEXT_LOG)
        self._print_plan()
        self.skips.say = progress.print
        self._losses: list[float] = []
        self._eval_loss = None
        interrupted = False
        started, self._seen_before = time.perf_counter(), self.seen
        self._steady, self._steps_run = [0, 0.0], 0  # work and seconds after the warm-up steps
        self._saved_step = None
        self.module.train()
        steps_per_epoch = self.sampler.steps_per_epoch
        self._restart_window()
        with StopFlag(info.world_size) as stop:
            while self.step < self.total_steps and not interrupted:
                epoch, in_epoch = divmod(self.step, steps_per_epoch)
                self.train_set.set_epoch(epoch)
                order = list(self.sampler.epoch_steps(epoch, in_epoch))[: self.total_steps - self.step]
                micro = [mb for _, micros in order for mb in micros]
                loader = iter(make_loader(self.train_set, micro, self.collate, t.dataloader_num_workers))
                pending = None  # the previous step, queued and not read back yet
                for i in range(len(order)):
                    waited = time.perf_counter()
                    batches = self.skips.take([next(loader) for _ in range(t.gradient_accumulation_steps)],
                                              self.step + 1)
                    self._data_wait += time.perf_counter() - waited  # the host blocked on the data loader
                    logged = (self.step + 1) % t.logging_steps == 0 or self.step + 1 == self.total_steps
                    prepared = self.recipe.prepare_step(self.module, batches, StepContext(
                        self.step, epoch, logged, self.output_dir, info.is_main))
                    handle = self.stepper(prepared.batches, self.step, prepared.logs)
                    self.step += 1
                    if pending is not None:  # read step n - 1 while step n runs
                        self._record(*pending)
                    pending = (self.step, handle)
                    saving = t.save_strategy == "steps" and self._due(t.save_steps)
                    evaluating = self.val_set is not None and self._due(t.eval_steps or t.save_steps)
                    stopping = stop.poll()  # every rank gets the same answer at the same step
                    if saving or evaluating or stopping or i == len(order) - 1:
                        self._record(*pending)
                        pending = None
                    if evaluating:
                        self._evaluate_and_log()
                    if saving:
                        self.save_checkpoint()
                    if stopping:
                        interrupted = True
                        break
                if t.save_strategy == "epoch" and not interrupted:
                    self.save_checkpoint()
        if stop.broken is not None:  # the signal broke the step it came in (StopFlag): nothing consistent to save
            interrupted, newest = True, self.checkpointer.newest()
            progress.print(f"stopped by {signal.Signals(stop.signum).name} during step {self.step + 1}, which it "
                           f"broke ({stop.broken}); no checkpoint of it: "
                           + (f"--resume_from_checkpoint auto resumes from {newest.name}" if newest else
                              "no earlier checkpoint exists"))
        elif interrupted:
            path = self.save_checkpoint() if self._saved_step != self.step else self._saved_path
            progress.print(f"stopped by {signal.Signals(stop.signum).name} at step {self.step}: {path.name} written; "
                           "resume with --resume_from_checkpoint auto")
        self.metrics.close()
        self._write_results(time.perf_counter() - started, interrupted)
        if info.is_main:
            self._write_report()
        return TrainResult(self.output_dir, self.step, self._losses, interrupted,
                           signal=stop.signum if interrupted else None)

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _record(self, step: int, handle) -> None:
        """Account for a finished step: counters, the non-finite limit, the metrics row and the progress bar."""
        t = self.cfg.train
        out = handle.result()
        self.seen += out["work"]
        self._steps_run += 1
        if self._steps_run > WARMUP_STEPS:  # this step's own time: from the previous finish mark to its own
            self._steady[0] += out["work"]
            self._steady[1] += self.stepper.clock.seconds(self._step_start, out["end"])
        self._step_start = out["end"]
        start, work = self._window
        work += out["work"]
        self._window = (start, work)
        self._losses.append(out["loss"])
        if not out["finite"]:
            self.bad_steps += 1
        if self.bad_steps > t.max_bad_steps:
            raise UserError(
                f"{self.bad_steps} steps had a non-finite loss or gradient (last at step {step}); lower "
                f"--learning_rate, check the data with `internvl-tune data check`, or raise --max_bad_steps"
            )
        if step % t.logging_steps == 0 or step == self.total_steps:
            unit = self.recipe.unit
            seconds = max(self.stepper.clock.seconds(start, out["end"]), 1e-9)
            terms = {k: v for k, v in out.items() if k not in ("work", "finite", "end")}
            row = {"epoch": round(step / self.sampler.steps_per_epoch, 4), **terms, f"{unit}_per_s": work / seconds,
                   "data_wait": round(min(1.0, self._data_wait / seconds), 4),
                   "memory_gib": round(memory_gib(self.info.device), 2), "skipped_steps": self.bad_steps}
            self.metrics.log(step, row)
            self.progress.update(step, f"loss {out['loss']:.4f} | {row[f'{unit}_per_s']:.0f} {unit}/s | "
                                       f"{row['memory_gib']:.1f} GiB", log=True)
            self._window, self._data_wait = (out["end"], 0), 0.0

    def _restart_window(self) -> None:
        """After a pause (validation, a checkpoint), time the next steps from now.

        A window's throughput is its work over the time between two finish marks of steps (CUDA events on GPUs);
        ``data_wait`` is the share of that time the host spent waiting for the data loader.
        """
        self._window, self._data_wait = (self.stepper.clock.mark(), 0), 0.0
        self._step_start = self._window[0]

    def save_checkpoint(self) -> Path:
        state = {"bad_steps": self.bad_steps, "work_seen": self.seen, "config": self.cfg.to_dict(),
                 "skipped_samples": self.skips.state(), "global_batch": self.sampler.global_batch,
                 "module": self.recipe.run_state()}
        path = self.checkpointer.save(self.step, self.optimizer, state)
        if self.info.is_main:  # whatever the hook draws (a LoRA adapter's fresh init) leaves the run's RNG alone
            with torch.random.fork_rng(devices=[self.info.device] if self.info.device.type == "cuda" else []):
                self.recipe.checkpoint_saved(path)
        self._saved_step, self._saved_path = self.step, path
        self.metrics.flush()
        self._restart_window()
        return path

    def _check_global_batch(self, state: dict) -> None:
        """Refuse to resume with another global batch (the data order of an epoch depends on it), naming the
        per-device batch and accumulation steps that give the checkpoint's on this many processes."""
        t, info, s = self.cfg.train, self.info, self.sampler
        old = state.get("global_batch")
        if old is None or old == s.global_batch:
            return
        packed = hasattr(s, "padding_waste")
        unit = "packs" if packed else "samples"
        per_device = 1 if packed else t.per_device_train_batch_size
        now = (f"{info.world_size} processes x {t.gradient_accumulation_steps} accumulation steps" if packed else
               f"{per_device} per device x {info.world_size} processes x {t.gradient_accumulation_steps} "
               "accumulation steps")
        options = [(b, old // (b * info.world_size)) for b in ([1] if packed else range(1, old + 1))
                   if old % (b * info.world_size) == 0]
        hint = ("; e.g. " + " or ".join(
            f"--gradient_accumulation_steps {a}" if packed else
            f"--per_device_train_batch_size {b} --gradient_accumulation_steps {a}" for b, a in options[-2:])
            if options else f"; no setting gives it on {info.world_size} processes: use a number of processes that "
                            f"divides {old}")
        raise UserError(f"{self.resumed_from} was trained with a global batch of {old} {unit} per step; this run's is "
                        f"{s.global_batch} ({now}). The data order of an epoch depends on the global batch, so a "
                        f"resume must keep it{hint}")

    # ------------------------------------------------------------------ validation
    def _evaluate_and_log(self) -> None:
        self._eval_loss = self.evaluate()
        self.metrics.log(self.step, {"eval_loss": self._eval_loss})
        self.progress.print(f"step {self.step}: eval_loss {self._eval_loss:.4f}")
        if self.cfg.train.eval_generate:
            self._generate_and_log()
        self._restart_window()

    def _generate_and_log(self) -> None:
        """``--eval_generate N``: the model answers N validation samples; their mean scores are logged beside the
        loss (``eval_gen_*``) and the answers written to ``eval_predictions/step-N.jsonl``."""
        from torch.distributed.fsdp import FSDPModule

        t, info = self.cfg.train, self.info
        self.module.eval()
        if isinstance(self.module, FSDPModule):  # generation calls the model below the root: gather the root's own
            self.module.unshard()
        means, rows = self.recipe.generate_eval(t.eval_generate, t.eval_generate_tokens, info.rank, info.world_size,
                                                all_gather_object_ordered)
        self.module.train()
        reshard(self.module)
        if not info.is_main:
            return
        scores = {k: v for k, v in means.items() if isinstance(v, float)}
        self.metrics.log(self.step, {f"eval_gen_{k}": v for k, v in scores.items()})
        folder = self.output_dir / PREDICTIONS_DIR
        folder.mkdir(exist_ok=True)
        (folder / f"step-{self.step}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                        encoding="utf-8")
        self.progress.print(f"step {self.step}: {len(rows)} generated answers: "
                            + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Weighted validation loss over the whole validation set, sharded across ranks.

        Every rank runs the same number of forward passes (FSDP gathers parameters collectively): a rank with fewer
        samples repeats its first batch and ignores the result.
        """
        info, size = self.info, self.cfg.train.per_device_train_batch_size
        indices = list(range(info.rank, len(self.val_set), info.world_size))
        batches = [indices[i : i + size] for i in range(0, len(indices), size)]
        most = math.ceil(math.ceil(len(self.val_set) / info.world_size) / size)
        counted = [True] * len(batches) + [False] * (most - len(batches))
        batches += [batches[0]] * (most - len(batches))
        total = torch.zeros((), dtype=torch.float64, device=info.device)
        weight = torch.zeros((), dtype=torch.float64, device=info.device)
        self.module.eval()
        for loaded, keep in zip(make_loader(self.val_set, batches, self.collate, 0), counted):
            (batch,) = self.skips.take([loaded], self.step, "validation", counted=keep)
            loss = self.module(batch.to(info.device))["loss"]
            if keep:
                total += loss.double()
                weight += batch.weight
        self.module.train()
        reshard(self.module)  # without a backward, FSDP would keep the gathered parameters registered
        return (all_reduce_sum(total) / all_reduce_sum(weight).clamp_min(1e-12)).item()

    # ------------------------------------------------------------------ export and reporting
    def export(self) -> Path:
        """Gather the trained weights to rank 0 and let the recipe write the final model into ``output_dir``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.info.is_main:
            try:
                with writing("the final model", self.output_dir):
                    self.recipe.export(full, self.output_dir)
            except StorageError as exc:  # one line (the recipe's own, or the one above) plus what to do next
                newest = self.checkpointer.newest()
                raise StorageError(f"{exc}; then run again with --resume_from_checkpoint auto: " + (
                    f"it resumes from {newest.name} and writes the final model" if newest else
                    "no checkpoint was saved, so it trains again")) from exc
            print(f"final model written to {self.output_dir}")
        barrier()
        return self.output_dir

    def memory_estimate(self, grad_checkpoint: float | str | None = None):
        """Peak GPU memory per rank predicted for this run (``train/memory.py``), or None for recipes without one.

        ``grad_checkpoint``: the estimate for another checkpointing mode than the run's.
        """
        shape = self.recipe.memory_shape(self.cfg.train.per_device_train_batch_size)
        if shape is None:
            return None
        mode = self.grad_checkpoint if grad_checkpoint is None else grad_checkpoint
        sharding = self._sharding()
        return estimate_training_memory(self.module, self.module.blocks(), world_size=self.info.world_size,
                                        grad_checkpoint=mode, compiled=self.compiled,
                                        compute_bytes=2 if self.compute_dtype is not None else 4,
                                        reshard_after_forward=sharding["reshard_after_forward"],
                                        cpu_offload=sharding["cpu_offload"], **shape)

    def _resolve_grad_checkpoint(self, mode: float | str) -> tuple[float | str, str]:
        """``(mode, plan note)``: ``auto`` becomes the fraction of checkpointed blocks that fits this GPU."""
        if mode != "auto":
            return mode, ""
        device = self.info.device
        if device.type != "cuda":
            return 1.0, "auto: every block (no GPU memory to fit)"
        if self.recipe.memory_shape(self.cfg.train.per_device_train_batch_size) is None:
            return 1.0, "auto: every block (this model has no memory estimate)"
        free, _ = torch.cuda.mem_get_info(device)
        available = (free + torch.cuda.memory_reserved(device)) / 2**30  # what this process holds counts as usable
        if torch.distributed.is_initialized():  # one mode on every rank: the smallest GPU decides
            smallest = torch.tensor(available, device=device)
            torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
            available = smallest.item()
        fraction, estimate = choose_grad_checkpoint(self.memory_estimate, available)
        return fraction, (f"auto: {fraction:g} of the blocks (estimate {estimate.total:.1f} GiB, +15 % fits "
                          f"{available:.1f} GiB available)")

    def plan_lines(self) -> list[str]:
        t, info, s = self.cfg.train, self.info, self.sampler
        unit = "packs" if hasattr(s, "padding_waste") else "samples"
        program = Path(sys.argv[0]).name
        program = "python -m internvl_tune.cli" if program == "__main__.py" else program
        lines = [f"command: {program} {shlex.join(sys.argv[1:])}"] + self.recipe.describe() + [
            f"parameters: {self.trainable / 1e6:.2f}M of {self.total_params / 1e6:.2f}M trainable",
            f"data: {len(self.train_set)} samples, global batch {s.global_batch} {unit} "
            f"({s.global_batch // (info.world_size * t.gradient_accumulation_steps)} x {info.world_size} ranks x "
            f"{t.gradient_accumulation_steps} accum), {s.steps_per_epoch} steps/epoch, {self.total_steps} steps"
            + (f", packed rows ({s.padding_waste():.1%} padding)" if hasattr(s, "padding_waste") else ""),
            self.skips.describe(),
            *self._truncation_plan(),
            f"device: {info.device} x {info.world_size}, compute dtype {self.compute_dtype or torch.float32}, "
            f"activation checkpointing {self.grad_checkpoint_note or self.recipe.grad_checkpoint}, torch.compile {'on' if self.compiled else 'off'}, "
            f"output: {self.output_dir}",
        ]
        if self.deepspeed is not None:
            lines.append(self.deepspeed.plan_line(info.world_size))
        estimate = self.memory_estimate()
        if estimate is not None:
            lines.append(estimate.describe())
        if self.resumed_from is not None:
            lines.append(f"resumed from {self.resumed_from} at step {self.step}")
        for data in (self.train_set, self.val_set):  # e.g. a dataset root found in two places: which one is used
            lines += [f"note: {n}" for n in getattr(data, "notices", ())]
        return lines

    def _truncation_plan(self) -> list[str]:
        """The plan line of samples longer than ``--max_seq_length`` (none for data that is never cut)."""
        if not getattr(self.train_set, "truncates", False):
            return []
        limit = self.cfg.data.max_seq_length
        return [f"samples longer than --max_seq_length {limit}: their tail is cut (counted as truncated_samples, the "
                f"first {NAMED_TRUNCATIONS} named)"]

    def _print_plan(self) -> None:
        if self.info.is_main:
            for line in self.plan_lines():
                self.progress.print(line)

    def describe(self) -> None:
        """Dry run: print the plan without training."""
        self.progress = StepProgress(self.total_steps, self.recipe.name, enabled=self.info.is_main)
        self._print_plan()
        self.progress.close()

    def _write_results(self, seconds: float, interrupted: bool) -> None:
        """``train_results.json``: the run's summary (as the transformers Trainer writes one), and the last lines.

        Throughput twice: the wall-clock average (``<unit>_per_s``: all this process's work over its whole time,
        compilation, checkpoints and validation included) and the steady state (``steady_<unit>_per_s``: the steps
        after the first ``WARMUP_STEPS`` of this process, each timed between two step finish marks, so pauses for
        checkpoints and validation are left out too). ``finished`` turns true once the final model is written
        (:meth:`finish`); a re-run with ``--resume_from_checkpoint auto`` then does nothing.
        """
        unit = self.recipe.unit
        work, busy = self._steady
        self.results = {
            "global_step": self.step, "epoch": round(self.step / self.sampler.steps_per_epoch, 4),
            "train_loss": self._losses[-1] if self._losses else None,
            "train_loss_mean": sum(self._losses) / len(self._losses) if self._losses else None,
            "eval_loss": self._eval_loss, "train_runtime_s": round(seconds, 2),
            f"{unit}_per_s": (self.seen - self._seen_before) / seconds if seconds > 0 else None,
            f"steady_{unit}_per_s": work / busy if busy > 0 else None, "steady_after_steps": WARMUP_STEPS,
            f"{unit}_seen": self.seen, "peak_memory_gib": round(memory_gib(self.info.device), 2),
            "skipped_steps": self.bad_steps, "skipped_samples": self.skips.count,
            "truncated_samples": self.skips.truncated, "interrupted": interrupted,
            "finished": False, "schedule": _schedule(self.cfg.train, self.info.world_size),
        }
        if self.info.is_main:
            self._save_results()
            last = "n/a" if self.results["train_loss"] is None else f"{self.results['train_loss']:.4f}"
            steady = self.results[f"steady_{unit}_per_s"]
            steady = (f"{steady:.0f} {unit}/s steady (after the first {WARMUP_STEPS} steps)" if steady is not None
                      else f"no steady-state figure (the first {WARMUP_STEPS} steps are warm-up)")
            self.progress.print(f"done: {self.step} steps in {seconds / 60:.1f} min, last loss {last}, "
                                f"{self.results[f'{unit}_per_s'] or 0:.0f} {unit}/s wall-clock average, {steady}")
            if self.skips.truncated:
                self.progress.print(f"truncated samples: {self.skips.truncated} cut to --max_seq_length "
                                    f"{self.cfg.data.max_seq_length} (their tails were not trained on; raise "
                                    "--max_seq_length or shorten them)")
        self.progress.close()

    def _save_results(self) -> None:
        with writing(RESULTS, self.output_dir):
            tmp = self.output_dir / (RESULTS + ".tmp")
            tmp.write_text(json.dumps(self.results, indent=2) + "\n")
            os.replace(tmp, self.output_dir / RESULTS)

    def finish(self) -> None:
        """Mark the run finished in ``train_results.json`` (after the final model is written)."""
        if self.info.is_main:
            self.results["finished"] = True
            self._save_results()

    def _write_report(self) -> None:
        """``report.html`` from the run's files; a report that cannot be built never fails the run."""
        from internvl_tune.report import write_run_report

        try:
            print(f"report: {write_run_report(self.output_dir)}")
        except Exception as exc:  # noqa: BLE001 - the run's own files are written; say why the page is missing
            print(f"warning: report.html not written ({type(exc).__name__}: {exc}); rebuild it with "
                  f"`internvl-tune report {self.output_dir}`")


def run(recipe: Recipe, cfg: RunConfig) -> TrainResult:
    """Train (or describe, with ``--dry_run``), export the final model, and tear down the process group."""
    try:
        try:
            trainer = Trainer(recipe, cfg)
        except AlreadyFinished as done:
            if done.is_main:
                print(f"{cfg.train.output_dir}: already finished at step {done.step}; nothing was changed (to train "
                      "further raise --max_steps or --num_train_epochs; to start over pass --overwrite_output_dir "
                      "True)", flush=True)
            return TrainResult(Path(cfg.train.output_dir), done.step, [], already_finished=True)
        if cfg.train.dry_run:
            trainer.describe()
            return TrainResult(trainer.output_dir, trainer.step, [])
        result = trainer.train()
        if not result.interrupted:
            trainer.export()
            trainer.finish()
        return result
    finally:
        shutdown()


def _schedule(t, world_size: int) -> dict:
    """The settings that decide how long a run is: a re-run with the same ones has nothing more to do."""
    return {"max_steps": t.max_steps, "num_train_epochs": t.num_train_epochs, "world_size": world_size,
            "per_device_train_batch_size": t.per_device_train_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps}


def _finished_step(output_dir: Path, schedule: dict) -> int | None:
    """The final step of a run in ``output_dir`` that finished (final model written) with ``schedule``, or None."""
    try:
        results = json.loads((Path(output_dir) / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(results, dict) and results.get("finished") and results.get("schedule") == schedule:
        return results.get("global_step")
    return None
