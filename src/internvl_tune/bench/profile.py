"""A training step under ``torch.profiler``, summarised into numbers that explain an MFU gap (JSON-ready).

Where the step's device time goes, by **phase** and by **kind** of work:

- phase: ``backward`` (work launched under the autograd engine: ``autograd::engine::evaluate_function``, which
  includes what a compiled block's backward *recomputes*), ``optimizer`` (under ``Optimizer.step``) and ``forward``
  (the rest: forward passes, the loss, gradient clipping);
- kind, from the kernel's name (on the CPU, from the ``aten::`` operator's): ``matmul``, ``attention``,
  ``fused`` (inductor's generated Triton kernels: norms, activations, LoRA dropout, casts fused together),
  ``elementwise`` (eager element-wise and reduction kernels), ``copy`` (memcpy, memset, cat), ``optimizer``
  (multi-tensor / fused AdamW kernels), ``communication`` (NCCL) and ``other``.

On a GPU the time is each kernel's own duration, credited to the CPU operator that launched it; on the CPU (tests)
it is each ``aten::`` operator's self time. The top kernels by total time come with their phase and kind.

``forward_regions`` splits the forward phase by the modules the caller names (``regions``: e.g. the frozen ViT and
the language model; the rest is embeddings, the projector, the LM head with the loss, and clipping), marked by
forward hooks on those modules (modules that run eagerly around their compiled blocks).

``recompute`` estimates how much backward matmul time is recomputation: the forward's matmul time per model FLOP,
times the backward's FLOPs without any recomputation (``backward_flops``, from the caller), is what the backward's
matmuls would take without it; the excess over that is put down to recomputation (an estimate: it assumes equal
matmul efficiency in both passes).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from internvl_tune.bench.common import sync

KINDS = (  # first match wins: attention kernels may contain "gemm" or "cutlass" in their names
    ("communication", re.compile(r"nccl", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot_product", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cutlass|cublas|nvjet|xmma|wgmma|aten::(mm|addmm|bmm|baddbmm|matmul|linear)\b",
                          re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|foreach", re.I)),
    ("fused", re.compile(r"^triton_|^triton\b", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|CatArrayBatched|aten::(cat|to|_to_copy|clone|contiguous)\b", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|reduce|aten::", re.I)),
)
BACKWARD_MARK = "autograd::engine::evaluate_function"
OPTIMIZER_MARK = "Optimizer.step"
REGION_MARK = "region::"


def kind_of(name: str) -> str:
    """The kind of work a kernel (or ``aten::`` operator) name stands for (see the module docstring)."""
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def phase_of(event) -> str:
    """``backward``, ``optimizer`` or ``forward``, from the profiler ranges above ``event`` on its thread."""
    parent = event
    while parent is not None:
        if parent.name.startswith(BACKWARD_MARK):
            return "backward"
        if parent.name.startswith(OPTIMIZER_MARK):
            return "optimizer"
        parent = parent.cpu_parent
    return "forward"


def region_of(event) -> str:
    """The innermost ``region::NAME`` range above ``event`` (:func:`regions`), or ``other``."""
    parent = event
    while parent is not None:
        if parent.name.startswith(REGION_MARK):
            return parent.name[len(REGION_MARK):]
        parent = parent.cpu_parent
    return "other"


@contextmanager
def regions(modules: dict[str, nn.Module]):
    """Mark each forward of ``modules`` as a profiler range ``region::NAME`` (removed on exit)."""
    from torch.autograd.profiler import record_function

    handles, open_ranges = [], {}
    for name, module in modules.items():
        def enter(mod, args, name=name):
            open_ranges[name] = record_function(REGION_MARK + name)
            open_ranges[name].__enter__()

        def leave(mod, args, out, name=name):
            open_ranges.pop(name).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _timed_work(events, cuda: bool):
    """``(name, event, microseconds)`` of every kernel (GPU) or ``aten::`` operator's self time (CPU); ``event``: the
    CPU event that launched it (or the operator)."""
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        if cuda:
            for kernel in event.kernels:
                yield kernel.name, event, kernel.duration
        elif event.name.startswith("aten::") and event.self_cpu_time_total > 0:
            yield event.name, event, event.self_cpu_time_total


def summarize(events, cuda: bool, wall_s: float, forward_flops: float = 0.0, backward_flops: float = 0.0,
              top: int = 15) -> dict:
    """The summary of a profiled step's ``events`` (``prof.events()``); see the module docstring."""
    by, forward_regions = defaultdict(float), defaultdict(float)
    kernels = defaultdict(lambda: [0.0, 0, "", ""])
    for name, event, us in _timed_work(events, cuda):
        kind, phase = kind_of(name), phase_of(event)
        by[phase, kind] += us
        if phase == "forward":
            forward_regions[region_of(event)] += us / 1e3
        entry = kernels[name]
        entry[0] += us
        entry[1] += 1
        entry[2], entry[3] = phase, kind
    total = sum(by.values()) or 1.0
    phases = {}
    for phase in ("forward", "backward", "optimizer"):
        kinds = {kind: by[phase, kind] / 1e3 for kind in [k for k, _ in KINDS] + ["other"] if by[phase, kind]}
        phases[phase] = {"ms": sum(kinds.values()), "by_kind_ms": kinds}
    kinds_total = defaultdict(float)
    for (_, kind), us in by.items():
        kinds_total[kind] += us
    out = {
        "timed": "GPU kernels" if cuda else "CPU operators (self time)",
        "wall_ms": wall_s * 1e3,
        "busy_ms": total / 1e3,
        "share_by_kind": {k: v / total for k, v in sorted(kinds_total.items(), key=lambda kv: -kv[1])},
        "phases": phases,
        "forward_regions": dict(forward_regions),
        "top": [{"name": name[:120], "ms": ms / 1e3, "calls": calls, "phase": phase, "kind": kind}
                for name, (ms, calls, phase, kind) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]],
    }
    fwd_mm = phases["forward"]["by_kind_ms"].get("matmul", 0.0)
    bwd_mm = phases["backward"]["by_kind_ms"].get("matmul", 0.0)
    if forward_flops and backward_flops and fwd_mm:
        expected = fwd_mm / forward_flops * backward_flops
        extra = max(0.0, bwd_mm - expected)
        out["recompute"] = {"backward_matmul_ms": bwd_mm, "without_recompute_ms": expected,
                            "recompute_matmul_ms": extra,
                            "share_of_backward": extra / phases["backward"]["ms"] if phases["backward"]["ms"] else 0.0}
    return out


def profile_step(step: Callable[[], object], device: torch.device, marked: dict[str, nn.Module] | None = None,
                 **flops) -> dict:
    """Run ``step()`` (a whole training step, its result read back) under the profiler; :func:`summarize` of it.

    ``marked``: modules whose forwards are reported as ``forward_regions``; ``flops``: ``forward_flops`` and
    ``backward_flops`` for the recompute estimate.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with regions(marked or {}), profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - start
    return summarize(prof.events(), cuda, wall, **flops)


def describe(summary: dict) -> str:
    """One line: busy share, the kinds' shares and the recompute estimate."""
    shares = ", ".join(f"{kind} {share:.0%}" for kind, share in summary["share_by_kind"].items() if share >= 0.01)
    text = (f"{summary['busy_ms']:.0f} ms of {summary['timed']} in a {summary['wall_ms']:.0f} ms step "
            f"(fwd {summary['phases']['forward']['ms']:.0f}, bwd {summary['phases']['backward']['ms']:.0f}, "
            f"optim {summary['phases']['optimizer']['ms']:.0f} ms): {shares}")
    if summary.get("forward_regions"):
        text += "; forward by region: " + ", ".join(f"{k} {v:.0f} ms" for k, v in summary["forward_regions"].items())
    if "recompute" in summary:
        text += f"; recompute ~{summary['recompute']['share_of_backward']:.0%} of the backward (matmul estimate)"
    return text
