"""Every GPU claim of the project checked by one command: ``internvl-tune bench verify --out DIR``.

It runs the parts of the table ``PARTS`` in order (most valuable first), each in its own process with a time limit, and
writes ``DIR/verify.json`` after every part and ``DIR/verify.md`` (a table: device, versions, date, commit, each
part's numbers and checks). The default overall budget, 540 s, fits one 10-minute GPU call: a part whose budget no
longer fits in what is left is skipped, with that reason, and later, cheaper parts still run.

Each part records its numbers as it goes, so a part stopped at its time limit keeps what it measured. Its
**checks** are correctness (compiled = eager within tolerance, finite losses, peak memory within the estimate +
15 %): one that fails makes the command exit 1, as does a part that crashes. Its **targets** (speed goals such as
45 % MFU) are reported, met or not, and never change the exit status.

``--tiny`` runs the same parts on the CPU with tiny shapes in one process (the CI test); parts that need a GPU or
a package that is missing are skipped with the reason.

Adding a part is one entry in ``PARTS``: a name, a time budget, a function ``part(ctx: PartContext, **options)``
named as ``module:function``, a line saying what it checks, and the options. The function records numbers with
``ctx.record``, correctness with ``ctx.check``, goals with ``ctx.target``, a one-line summary with ``ctx.summary``,
and raises ``Skip`` when it cannot run here. ``ctx.tiny`` asks for the CPU shapes, ``ctx.device`` is the device,
``ctx.work`` a scratch folder and ``ctx.time_left()`` the seconds before its budget ends. Two ready forms:

- another shape for an existing part: ``Part("lora8b_35", 150, "internvl_tune.bench.verify_parts:lora8b", "...",
  {"shape": "internvl3_5-8b"})`` (``lora8b``, ``full1b``, ``preference`` and ``auto`` take ``shape``);
- a bench script's ``run(args) -> dict``: ``Part("grpo", 150, "internvl_tune.bench.verify_parts:script", "...",
  {"run": "internvl_tune.bench.grpo:run", "argv": [...], "tiny_argv": [...]})`` (see ``verify_parts.script``).

This module imports only the standard library at the top: a part's process starts fast, and the GPU is touched only
by the parts' own processes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from internvl_tune.cli.flags import add_bool_flag, description
from internvl_tune.errors import UserError

MEMORY_MARGIN = 1.15  # a measured peak may exceed the printed estimate by at most 15 % (train/memory.py's rule)
DEFAULT_BUDGET_S = 540.0


@dataclass(frozen=True)
class Part:
    """One entry of the verification: ``target`` is ``"module:function"``, called with a :class:`PartContext` and
    ``options`` as keyword arguments (JSON values: e.g. another ``shape``)."""

    name: str
    budget_s: float
    target: str
    what: str
    options: dict | None = None


PARTS: list[Part] = [
    Part("peak", 25, "internvl_tune.bench.verify_parts:peak", "bf16 matmul peak (the MFU denominator)"),
    Part("smoke", 240, "internvl_tune.bench.verify_parts:smoke",
         "compiled = eager: the training CLIs on tiny checkpoints (packed; LoRA + checkpointing; dropout + drop path; "
         "retrieval head)"),
    Part("lora8b", 150, "internvl_tune.bench.verify_parts:lora8b",
         "InternVL2-8B LoRA r16 + checkpointing, compiled, vs the plain transformers + peft loop; a profiled step"),
    Part("full1b", 150, "internvl_tune.bench.verify_parts:full1b",
         "InternVL2-1B full fine-tuning, compiled, vs the plain transformers loop"),
    Part("e2e", 100, "internvl_tune.bench.verify_parts:e2e",
         "internvl-tune train on JPEG files (InternVL2-1B, 8 workers) vs the harness"),
    Part("qlora76b", 90, "internvl_tune.bench.verify_parts:qlora76b",
         "QLoRA InternVL2-76B on one GPU: peak memory vs the estimate"),
    Part("preference", 240, "internvl_tune.bench.verify_parts:preference",
         "DPO and MPO steps (InternVL2-2B LoRA r16, compiled) vs a plain transformers + peft DPO loop"),
    Part("full14b", 45, "internvl_tune.bench.verify_parts:full14b",
         "InternVL-14B full 364 px step: one GPU's share of an 8-GPU FSDP2 run, scaled from 1/8 and 1/4 depth"),
    Part("auto", 90, "internvl_tune.bench.verify_parts:auto",
         "--grad_checkpoint auto on InternVL2-8B LoRA: the mode it picks here, its estimate vs the measured peak"),
    # InternVL3.5 (a second call: --parts lora8b_35,moe30b,gptoss20b; the default budget is spent before them)
    Part("lora8b_35", 150, "internvl_tune.bench.verify_parts:lora8b",
         "InternVL3.5-8B (Qwen3) LoRA r16 + checkpointing, compiled, vs the plain transformers + peft loop",
         {"shape": "internvl3_5-8b", "tiny_shape": "tiny-qwen3", "x_plain": 5.0}),
    Part("moe30b", 150, "internvl_tune.bench.verify_parts:moe_lora",
         "InternVL3.5-30B-A3B LoRA r16 on attention + experts, compiled, MFU on active parameters, vs the plain "
         "transformers + peft loop (12 of 48 LLM layers)",
         {"shape": "internvl3_5-30b-a3b", "tiny_shape": "tiny-qwen3-moe", "llm_layers": 12, "mfu": 0.25}),
    Part("gptoss20b", 150, "internvl_tune.bench.verify_parts:moe_lora",
         "InternVL3.5-GPT-OSS-20B-A4B LoRA r16 on attention + experts (sinks, sliding window), compiled, vs the plain "
         "transformers + peft loop (8 of 24 LLM layers)",
         {"shape": "internvl3_5-gpt-oss-20b-a4b", "tiny_shape": "tiny-gpt-oss", "llm_layers": 8}),
    Part("grpo", 150, "internvl_tune.bench.verify_parts:script",
         "GRPO on InternVL2-2B: our rollout engine against transformers' generate (same prompts, G=8, 512 tokens), "
         "and one step's generation / update split",
         {"run": "internvl_tune.bench.grpo:run", "argv": ["--steps", "1", "--repeats", "2"], "tiny_argv": ["--tiny"]}),
]


class Skip(Exception):
    """Raised by a part that cannot run here; the message says why."""


class PartContext:
    """What a part gets (see the module docstring); every record is written out at once."""

    def __init__(self, name: str, tiny: bool, work: Path, seconds: float, matmul_peak: float | None = None,
                 write=None):
        self.name, self.tiny, self.work = name, tiny, work
        self.deadline = time.monotonic() + seconds
        self.matmul_peak = matmul_peak
        self.result: dict = {"numbers": {}, "checks": [], "targets": [], "summary": ""}
        self._write = write or (lambda result: None)

    @property
    def device(self):
        """The CPU with ``--tiny``, else the GPU (torch is imported on first use, not before)."""
        import torch

        return torch.device("cpu" if self.tiny else "cuda")

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def _save(self) -> None:
        self._write(self.result)

    def record(self, **numbers) -> None:
        """Numbers (JSON-ready) of the part, kept even if the part is stopped later."""
        self.result["numbers"].update(numbers)
        self._save()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        """A correctness check: a failed one makes ``bench verify`` exit 1."""
        self.result["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        self._save()
        return bool(ok)

    def target(self, name: str, met: bool | None, detail: str = "") -> None:
        """A goal (speed, memory): reported, never a failure. ``met`` None: not measurable here (nor on tiny shapes,
        whose speed says nothing about the goal)."""
        if self.tiny and met is not None:
            met, detail = None, f"{detail}; tiny shapes on the CPU".lstrip("; ")
        self.result["targets"].append({"name": name, "met": met, "detail": detail})
        self._save()

    def summary(self, text: str) -> None:
        self.result["summary"] = text
        self._save()

    def peak_tflops(self) -> float:
        """The bf16 matmul peak: from the ``peak`` part when it ran, else measured now."""
        if not self.matmul_peak:
            from internvl_tune.bench.common import measure_matmul_peak

            n = 256 if self.tiny else 8192
            self.matmul_peak = measure_matmul_peak(self.device, n=n)
            self.record(matmul_peak_tflops=self.matmul_peak)
        return self.matmul_peak


def resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run_part(target: str, ctx: PartContext, options: dict | None = None) -> dict:
    """Call the part; its result with ``status``: ok, failed (a check failed), skipped or error."""
    start = time.monotonic()
    try:
        resolve(target)(ctx, **(options or {}))
        failed = [c["name"] for c in ctx.result["checks"] if not c["ok"]]
        ctx.result["status"] = "failed" if failed else "ok"
    except Skip as reason:
        ctx.result.update(status="skipped", reason=str(reason))
    except (Exception, SystemExit) as exc:  # a crashing part must not cost the others' numbers
        ctx.result.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:1000]}",
                          traceback=traceback.format_exc()[-4000:])
    ctx.result["seconds"] = time.monotonic() - start
    ctx._save()
    return ctx.result


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, default=str))
    os.replace(tmp, path)


def _finite(value):
    """``value`` with every NaN or infinity as None: strict JSON (``json`` would write ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------- part processes
def worker(spec_path: str) -> NoReturn:
    """The entry of a part's own process: run the part named by the spec file, writing its result file."""
    spec = json.loads(Path(spec_path).read_text())
    ctx = PartContext(spec["name"], spec["tiny"], Path(spec["work"]), spec["seconds"], spec["matmul_peak"],
                      write=lambda result: _atomic_json(Path(spec["result"]), result))
    run_part(spec["target"], ctx, spec["options"])
    sys.stdout.flush()
    sys.stderr.flush()
    # the result is written: leave now rather than risk a hang in shutdown handlers (process groups, loader
    # workers); whatever this process started is stopped by the runner
    os._exit(0)


def _child_env() -> dict:
    env = dict(os.environ)
    # the part's process imports what this one imports (a source tree on sys.path included)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and Path(p).exists())
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as every internvl-tune command
    return env


def _kill(process: subprocess.Popen) -> None:
    """Stop the part's process and everything it started (compile workers, data-loader workers): its session."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue


def isolated(part: Part, seconds: float, tiny: bool, work: Path, logs: Path, matmul_peak: float | None) -> dict:
    """Run ``part`` in its own process, stopped after ``seconds``; its result (what it recorded, if stopped)."""
    result_path = work / f"{part.name}.result.json"
    result_path.unlink(missing_ok=True)
    spec = work / f"{part.name}.spec.json"
    # the part winds down on its own a little before it would be stopped
    spec.write_text(json.dumps({"name": part.name, "target": part.target, "tiny": tiny, "work": str(work / part.name),
                                "seconds": max(1.0, seconds * 0.9 - 5), "matmul_peak": matmul_peak,
                                "result": str(result_path), "options": part.options}))
    (work / part.name).mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(logs / f"{part.name}.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "internvl_tune.bench.verify", "--worker", str(spec)],
                                   stdout=log, stderr=subprocess.STDOUT, env=_child_env(), start_new_session=True)
        try:
            code = process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            code = None
        _kill(process)  # also what it left running when it exited
    result = json.loads(result_path.read_text()) if result_path.is_file() else \
        {"numbers": {}, "checks": [], "targets": [], "summary": ""}
    result["seconds"] = time.monotonic() - start
    if code is None and "status" not in result:
        result.update(status="timeout", reason=f"stopped at its time limit of {seconds:.0f} s; numbers recorded "
                                               f"before that are kept")
    elif code is None:  # it had finished (its own status stands) and then did not exit
        pass
    elif "status" not in result or code != 0:
        tail = (logs / f"{part.name}.log").read_text(errors="replace")[-1500:]
        result.update(status="error", error=f"its process exited with code {code} before finishing "
                                            f"(killed, out of memory, or a crash): {tail}")
    return result


# ----------------------------------------------------------------------------------------------- the report
def environment(tiny: bool, commit: str | None) -> dict:
    """Device, versions, date and commit of this run (the GPU is not touched here: its name comes from
    ``nvidia-smi``, and the parts add what torch sees)."""
    from importlib import metadata

    import torch

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": commit or git_commit(), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
           "transformers": version("transformers"), "peft": version("peft"), "bitsandbytes": version("bitsandbytes"),
           "python": platform.python_version(), "host_cpus": os.cpu_count(), "tiny": tiny}
    env["device"] = "cpu" if tiny else nvidia_smi()
    return env


def nvidia_smi() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()
        return out[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def exit_code(parts: list[dict]) -> int:
    """1 when a check failed or a part crashed; 0 otherwise (skipped and stopped parts included)."""
    return 1 if any(p["status"] in ("failed", "error") for p in parts) else 0


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    """``verify.md``: the environment, then one row per part (numbers, checks and targets)."""
    env = report["env"]
    lines = [f"# bench verify: {env['device']}", "", "| | |", "|---|---|"]
    for key in ("device", "torch", "cuda", "transformers", "peft", "bitsandbytes", "date", "commit"):
        lines.append(f"| {key} | {_cell(env.get(key, ''))} |")
    status = "all checks passed" if report["exit_code"] == 0 else "FAILED"
    lines += [f"| budget | {report['budget_s']:.0f} s, used {report['seconds']:.0f} s |",
              f"| result | {status} (exit {report['exit_code']}) |", "",
              "| part | status | s | numbers | checks | targets |", "|---|---|---:|---|---|---|"]
    for p in report["parts"]:
        checks = "; ".join(f"{'✔' if c['ok'] else '✘'} {c['name']}" + (f" ({c['detail']})" if c["detail"] else "")
                           for c in p.get("checks", []))
        targets = "; ".join(f"{ {True: 'met', False: 'not met', None: 'n/a'}[t['met']]}: {t['name']}"
                            + (f" ({t['detail']})" if t["detail"] else "") for t in p.get("targets", []))
        text = p.get("summary") or p.get("reason") or p.get("error", "")
        if p["status"] in ("error", "timeout") and p.get("summary"):
            text += f" — {p.get('error') or p.get('reason')}"
        lines.append(f"| {p['name']} | {p['status']} | {p.get('seconds', 0):.0f} | {_cell(text[:1200])} | "
                     f"{_cell(checks)} | {_cell(targets)} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internvl-tune bench verify", description=description(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="parts, in order:\n" + "\n".join(f"  {p.name:<11} ({p.budget_s:.0f} s) {p.what}" for p in PARTS))
    parser.add_argument("--out", default=None, help="folder for verify.json, verify.md and each part's log (required)")
    parser.add_argument("--parts", default=",".join(p.name for p in PARTS),
                        help="comma list of the parts to run, in the order given (default: all, in the order below)")
    parser.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S,
                        help="overall time budget in seconds; a part whose own budget no longer fits is skipped")
    add_bool_flag(parser, "tiny", False, "tiny shapes on the CPU, every part in this process (seconds; the CI test)")
    parser.add_argument("--isolate", default="auto", choices=("auto", "True", "False"),
                        help="each part in its own process with a hard time limit (auto: on a GPU, not with --tiny)")
    parser.add_argument("--work", default=None,
                        help="scratch folder for checkpoints, images and runs (default: a temporary folder, removed)")
    parser.add_argument("--commit", default=None, help="the commit being verified (default: git rev-parse HEAD)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a part's own process (internal)
    return parser


def select(names: str) -> list[Part]:
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {p.name for p in PARTS}
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise UserError(f"--parts {names!r}: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(p.name for p in PARTS)}")
    by_name = {p.name: p for p in PARTS}
    return [by_name[n] for n in dict.fromkeys(wanted)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args.worker)
    if not args.out:
        raise UserError("--out is required: the folder for verify.json, verify.md and the parts' logs")
    parts = select(args.parts)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        raise UserError("`bench verify` measures on a GPU and none is visible here; --tiny runs the same parts with "
                        "tiny shapes on the CPU")
    isolate = (not args.tiny) if args.isolate == "auto" else args.isolate == "True"
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    scratch = None if args.work else tempfile.TemporaryDirectory(prefix="internvl-verify-")
    work = Path(args.work or scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report = {"env": environment(args.tiny, args.commit), "budget_s": args.budget_s, "parts": [], "exit_code": 0,
              "seconds": 0.0}
    matmul_peak = None

    def save() -> None:
        report["seconds"] = time.monotonic() - start
        report["exit_code"] = exit_code(report["parts"])
        _atomic_json(out / "verify.json", report)
        (out / "verify.md").write_text(markdown(report))

    try:
        for part in parts:
            left = args.budget_s - (time.monotonic() - start)
            print(f"[verify] {part.name}: {part.what}", flush=True)
            if left < part.budget_s:
                result = {"status": "skipped", "reason": f"the overall budget is gone: {left:.0f} s left, this part "
                                                         f"needs {part.budget_s:.0f} s", "seconds": 0.0}
            elif isolate:
                result = isolated(part, part.budget_s, args.tiny, work, logs, matmul_peak)
            else:
                ctx = PartContext(part.name, args.tiny, work / part.name, part.budget_s, matmul_peak)
                (work / part.name).mkdir(parents=True, exist_ok=True)
                result = run_part(part.target, ctx, part.options)
            result = {"name": part.name, "budget_s": part.budget_s, **result}
            if part.name == "peak" and result.get("numbers", {}).get("tflops"):
                matmul_peak = result["numbers"]["tflops"]
            if result.get("numbers", {}).get("device") and report["env"]["device"] in ("unknown", "cpu"):
                report["env"]["device"] = result["numbers"]["device"]
            report["parts"].append(result)
            save()
            print(f"[verify] {part.name}: {result['status']} in {result.get('seconds', 0):.0f} s: "
                  f"{result.get('summary') or result.get('reason') or result.get('error', '')[:300]}", flush=True)
    finally:
        save()
        if scratch is not None:
            scratch.cleanup()
    print(f"[verify] {out / 'verify.json'}, {out / 'verify.md'}: exit {report['exit_code']}", flush=True)
    return report["exit_code"]


if __name__ == "__main__":
    from internvl_tune.bench import verify  # this module under its own name: the parts raise *its* Skip

    raise SystemExit(verify.main())
