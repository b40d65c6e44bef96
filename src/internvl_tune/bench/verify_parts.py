"""The parts of ``internvl-tune bench verify`` (the table is ``bench/verify.py``'s ``PARTS``).

Each part measures one claim on a GPU with the released shapes and random weights, or on the CPU with tiny shapes
(``ctx.tiny``: the same code paths in seconds, compilation off), records its numbers as it goes, and checks what
must hold. Where a part runs fewer layers than the model has, it says so and how it scales.
"""

from __future__ import annotations

import json
import math
import os
import platform

import torch

from internvl_tune.bench.verify import MEMORY_MARGIN, PartContext, Skip


# ----------------------------------------------------------------------------------------------- shared checks
def check_finite(ctx: PartContext, label: str, losses: list[float], skipped_steps: int = 0) -> bool:
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    detail = f"last {losses[-1]:.4f}" if losses else "no loss"
    if skipped_steps:
        detail += f"; {skipped_steps} step(s) skipped as non-finite"
    return ctx.check(f"{label}: losses finite", finite and not skipped_steps, detail)


def check_memory(ctx: PartContext, label: str, peak_gib: float, estimate_gib: float) -> None:
    """The measured peak within the printed estimate + 15 % (only where there is GPU memory to measure)."""
    if ctx.device.type != "cuda":
        return
    ctx.check(f"{label}: peak <= estimate + 15 %", peak_gib <= estimate_gib * MEMORY_MARGIN,
              f"{peak_gib:.1f} GiB, estimate {estimate_gib:.1f} GiB ({peak_gib / estimate_gib - 1:+.0%})")


def target_at_least(ctx: PartContext, name: str, value: float, goal: float, fmt: str) -> None:
    ctx.target(name, value >= goal, f"{value:{fmt}}")


def target_at_most(ctx: PartContext, name: str, value: float, goal: float, fmt: str) -> None:
    if ctx.device.type != "cuda":
        ctx.target(name, None, "no GPU memory to measure")
        return
    ctx.target(name, value <= goal, f"{value:{fmt}}")


def _rate(row: dict) -> str:
    return f"{row['tokens_per_s']:,.0f} ({row['tokens_per_s_min']:,.0f}-{row['tokens_per_s_max']:,.0f})"


def _memory(row: dict, estimate: float | None = None) -> str:
    if not row.get("peak_gib"):
        return ""
    return f", {row['peak_gib']:.1f} GiB" + (f" (estimate {estimate:.1f})" if estimate else "")


# ----------------------------------------------------------------------------------------------- parts
def peak(ctx: PartContext) -> None:
    """The bf16 matmul peak of this device (the MFU denominator of every later part)."""
    from internvl_tune.bench.common import measure_matmul_peak

    n = 256 if ctx.tiny else 8192
    tflops = measure_matmul_peak(ctx.device, n=n, repeats=3 if ctx.tiny else 50)
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        device = {"device": props.name, "memory_gib": props.total_memory / 2**30,
                  "capability": f"{props.major}.{props.minor}"}
    else:
        device = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"}
    ctx.record(tflops=tflops, matmul_n=n, **device)
    ctx.summary(f"bf16 matmul {n}^3: {tflops:,.4g} TFLOP/s on {device['device']}")


def smoke(ctx: PartContext) -> None:
    """``bench smoke``: the training CLIs with tiny checkpoints, compiled and eager; the losses must agree."""
    from internvl_tune.bench.gpu_smoke import run

    tolerance = 1e-2  # bf16 noise measured 1.1e-4 and 1.2e-4 on an H100 (12 steps)
    compiled = "False" if ctx.tiny else "True"
    result = run(ctx.work / "smoke", steps=1 if ctx.tiny else 8, workers=0 if ctx.tiny else 2, compiled=compiled,
                 tolerance=tolerance)
    ctx.record(**result)
    for name, r in result["runs"].items():
        check_finite(ctx, f"{name} (exit {r['exit']})", r["losses"] if r["exit"] == 0 else [])
    for name in ("train, packed", "train, packed, LoRA + ckpt"):
        worst = result["pairs"].get(name)
        ctx.check(f"{name}: compiled = eager", worst is not None and worst < tolerance,
                  f"worst relative loss difference {worst:.1e} < {tolerance:g}" if worst is not None else "a run failed")
    note = " (tiny: every run eager: inductor on a CPU takes minutes)" if ctx.tiny else ""
    ctx.summary("compiled vs eager, worst relative loss difference: "
                + ", ".join(f"{k} {v:.1e}" for k, v in result["pairs"].items()) + note)


def _ours_vs_plain(ctx: PartContext, shape: str, lora_rank: int, grad_checkpoint: str, steps: int, rounds: int,
                   profile: bool, tiny_shape: str = "tiny", llm_layers: int | None = None, warm_steps: int = 3) -> dict:
    """Our compiled step against the plain loop on the same samples, alternated (``bench/compare.py``): ``rounds``
    rounds of ``steps`` packed steps of ours, the plain loop taking the same samples one by one. With ``profile``,
    one more step of ours under the profiler (``bench/profile.py``) once both are warm, before the rounds: the
    profile matters more than a round that the time limit might cut. ``tiny_shape``: the CPU shape of the family;
    ``llm_layers``: both loops run that many of the LLM's layers (both stay in memory)."""
    from internvl_tune.bench.common import phase_flops, synthetic_samples
    from internvl_tune.bench.compare import alternate, ratio, schedule
    from internvl_tune.bench.ours import build_ours, compiled_graphs, packs_of
    from internvl_tune.bench.plain import PlainLoop
    from internvl_tune.bench.profile import describe

    tiny = ctx.tiny
    shape, layers = (tiny_shape, None) if tiny else (shape, llm_layers)
    rank = min(lora_rank, 4) if tiny else lora_rank
    samples = synthetic_samples(8, seed=0, tiles=(1, 2), text=(16, 64)) if tiny else synthetic_samples(48, seed=0)
    packed = 512 if tiny else 8192
    packs, waste = packs_of(samples, packed)
    warm, timed_rounds = schedule(packs, 1 if tiny else warm_steps, 1 if tiny else steps, 3 if tiny else rounds)
    peak = ctx.peak_tflops()
    ours = build_ours(shape, samples, ctx.device, packed, compile=not tiny, grad_checkpoint=grad_checkpoint,
                      lora_rank=rank, llm_layers=layers)
    ctx.record(shape=shape, llm_layers=ours.extra["text_config"].num_hidden_layers, variant=ours.name,
               estimate_gib=ours.estimate_gib, padding_waste=waste, matmul_peak_tflops=peak,
               steps_per_round=len(timed_rounds[0]), compiled=not tiny)
    plain = PlainLoop(shape, samples, ctx.device, rank, grad_checkpoint != "False", layers)
    graphs, profiled = {}, {}

    def warmed():
        graphs["warm"] = compiled_graphs()
        if profile:
            pack = timed_rounds[0][0]
            fwd, bwd = phase_flops(ours.extra["counts"], ours.extra["text_config"], [samples[i] for i in pack],
                                   ours.extra["lora"])
            profiled.update(ours.profile(pack, forward_flops=fwd, backward_flops=bwd))
            ctx.record(profile=profiled)
            ctx.summary("profile: " + describe(profiled))
            graphs["warm"] = compiled_graphs()

    def saved(stats):
        o, p = stats[ours.name].summary(peak), stats[plain.name].summary(peak)
        ctx.record(ours=o, plain=p, **ratio(o, p), rounds=o["repeats"])

    stats = alternate([ours, plain], warm, timed_rounds, deadline=ctx.deadline, on_repeat=saved, on_warm=warmed)
    o, p = stats[ours.name].summary(peak), stats[plain.name].summary(peak)
    x = ratio(o, p)
    if not tiny:
        ctx.record(compiled_graphs=compiled_graphs(), recompiles_while_timed=compiled_graphs() - graphs["warm"])
    check_finite(ctx, ours.name, [r.loss for r in stats[ours.name].repeats], ours.nonfinite)
    check_finite(ctx, plain.name, [r.loss for r in stats[plain.name].repeats])
    check_memory(ctx, ours.name, o["peak_gib"], ours.estimate_gib)
    text = (f"ours {_rate(o)} tokens/s, MFU {o['mfu']:.1%}{_memory(o, ours.estimate_gib)}; plain {_rate(p)}"
            f"{_memory(p)}; {x['x_plain']:.2f}x plain ({x['x_plain_min']:.2f}-{x['x_plain_max']:.2f}); medians of "
            f"{o['repeats']} alternated rounds")
    ctx.summary(text + (f"; profile: {describe(profiled)}" if profiled else ""))
    return o | x


def lora8b(ctx: PartContext, shape: str = "internvl2-8b", tiny_shape: str = "tiny", x_plain: float = 4.0) -> None:
    """InternVL2-8B LoRA r16 with activation checkpointing, compiled, against the plain transformers + peft loop."""
    row = _ours_vs_plain(ctx, shape, lora_rank=16, grad_checkpoint="True", steps=2, rounds=3, profile=True,
                         tiny_shape=tiny_shape)
    target_at_least(ctx, "MFU >= 45 %", row["mfu"], 0.45, ".1%")
    target_at_most(ctx, "peak <= 24 GiB", row["peak_gib"], 24.0, ".1f")
    target_at_least(ctx, f">= {x_plain:g}x the plain loop (median)", row["x_plain"], x_plain, ".2f")


def moe_lora(ctx: PartContext, shape: str, tiny_shape: str, llm_layers: int, mfu: float | None = None) -> None:
    """A mixture-of-experts InternVL3.5 with LoRA r16 on the attention and the experts (grouped products, routers
    frozen) and activation checkpointing, compiled, against the plain transformers + peft loop (transformers' own
    experts forward, peft's expert LoRA); MFU counts the active parameters. Both loops hold the model, so it runs
    ``llm_layers`` of the LLM's layers (the ViT and the LM head in full); the summary says so."""
    row = _ours_vs_plain(ctx, shape, lora_rank=16, grad_checkpoint="True", steps=1, rounds=3, profile=False,
                         tiny_shape=tiny_shape, llm_layers=llm_layers, warm_steps=2)
    if not ctx.tiny:
        from internvl_tune.bench.shapes import LLMS, SHAPES

        ctx.summary(ctx.result["summary"] + f"; {llm_layers} of the {LLMS[SHAPES[shape][1]]['num_hidden_layers']} "
                    "LLM layers (both loops hold the model; the full depth weighs the layers, where the MFU is made, "
                    "more)")
    if mfu is not None:
        target_at_least(ctx, f"MFU (active parameters) >= {mfu:.0%}", row["mfu"], mfu, ".1%")
    target_at_least(ctx, "faster than the plain loop (median)", row["x_plain"], 1.0, ".2f")


def full1b(ctx: PartContext, shape: str = "internvl2-1b") -> None:
    """InternVL2-1B full fine-tuning (frozen ViT), compiled, against the plain transformers loop."""
    row = _ours_vs_plain(ctx, shape, lora_rank=0, grad_checkpoint="False", steps=4, rounds=4, profile=False)
    target_at_least(ctx, "MFU >= 40 %", row["mfu"], 0.40, ".1%")
    target_at_least(ctx, ">= 5x the plain loop (median)", row["x_plain"], 5.0, ".2f")


def e2e(ctx: PartContext) -> None:
    """``bench e2e``: ``internvl-tune train`` on JPEG files against the harness (CPU: the data loader alone)."""
    from internvl_tune.bench import e2e as bench_e2e

    out, path = ctx.work / "e2e", ctx.work / "e2e.json"
    if ctx.tiny:
        argv = ["--shape", "tiny", "--loader_only", "--workers", "0", "--samples", "8", "--steps", "2",
                "--packed_tokens", "2048"]
    else:
        argv = ["--samples", "128", "--steps", "24", "--warmup", "8", "--workers", "8"]
    code = bench_e2e.main(["--out", str(out), "--json", str(path), *argv])
    ctx.check("bench e2e finished", code == 0, f"exit {code}")
    if not path.is_file():
        return
    row = json.loads(path.read_text())
    ctx.record(**row)
    if ctx.tiny:
        ctx.summary(f"data loader alone (tiny, no GPU run): {row['loader_tokens_per_s']:,.0f} tokens/s with "
                    f"{row['workers']} workers")
        ctx.target("e2e >= 90 % of the harness", None, "needs a GPU")
        return
    ctx.summary(f"train on JPEGs {row['e2e_tokens_per_s']:,.0f} tokens/s (median of logged steps), harness "
                f"{row['harness_tokens_per_s']:,.0f}: ratio {row['ratio']:.2f}; data wait {row['data_wait_share']:.1%} "
                f"of the step time ({row['workers']} workers)")
    target_at_least(ctx, "e2e >= 90 % of the harness", row["ratio"], 0.9, ".2f")


def qlora76b(ctx: PartContext) -> None:
    """``bench qlora``: InternVL2-76B with NF4 LLM linears and LoRA r16 on one GPU, peak memory vs the estimate."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed (pip install 'internvl-tune[qlora]')")
    from internvl_tune.bench.qlora_check import run

    shape, steps, packed, rank = ("tiny", 1, 512, 4) if ctx.tiny else ("internvl2-76b", 4, 4096, 16)
    row = run(shape, ctx.device, steps, packed, rank, 0.05)
    estimate = row.pop("estimate").total
    ctx.record(**row, estimate_gib=estimate)
    check_finite(ctx, f"{shape} QLoRA", row["losses"])
    check_memory(ctx, f"{shape} QLoRA", row["peak_gib"], estimate)
    ctx.summary(f"{shape} QLoRA r{rank}, {packed}-token steps: peak {row['peak_gib']:.1f} GiB (estimate "
                f"{estimate:.1f}), {min(row['step_s']):.2f}-{max(row['step_s']):.2f} s a step, built in "
                f"{row['build_s']:.0f} s")


def preference(ctx: PartContext, shape: str = "internvl2-2b") -> None:
    """DPO and MPO (LoRA, the reference pass with adapters disabled) against the plain peft DPO loop."""
    from internvl_tune.bench.compare import alternate, ratio, schedule
    from internvl_tune.bench.ours import compiled_graphs
    from internvl_tune.bench.plain import PlainDPOLoop
    from internvl_tune.bench.preference import build_ours_preference, pair_packs, pins, synthetic_pairs
    from internvl_tune.data.preference import PreferenceCollator

    tiny = ctx.tiny
    shape, rank, packed = ("tiny", 4, 1024) if tiny else (shape, 16, 8192)
    pairs = synthetic_pairs(6, tiles=(1, 2), question=(8, 32), answer=(8, 32)) if tiny else synthetic_pairs(32)
    data: dict = {}
    dpo = build_ours_preference("dpo", shape, pairs, ctx.device, packed, compile=not tiny, lora_rank=rank, data=data)
    mpo = build_ours_preference("mpo", shape, pairs, ctx.device, packed, compile=not tiny, lora_rank=rank, data=data)
    plain = PlainDPOLoop(shape, dpo.extra["pair"], ctx.device, rank, grad_checkpoint=True)
    packs = pair_packs(pairs, packed)
    ctx.record(shape=shape, pairs_per_pack=sum(map(len, packs)) / len(packs), estimate_gib=dpo.estimate_gib)
    if ctx.device.type == "cuda":  # the pin thread's crash on padded pairs (issue 26)
        collate = dpo.extra["collator"]
        pinned = pins(PreferenceCollator, [dpo.extra["pair"](i) for i in packs[0][:2]], collate.img_context_token_id,
                      collate.num_image_token)
        for layout, outcome in pinned.items():
            ctx.check(f"a {layout} preference batch pins", outcome == "ok", outcome)
    warm, rounds = schedule(packs, 1 if tiny else 2, 1 if tiny else 2, 3)
    graphs = {}

    def saved(stats):
        rows = {loop.name: stats[loop.name].summary() for loop in (dpo, mpo, plain)}
        ctx.record(**{key: rows[loop.name] for key, loop in (("dpo", dpo), ("mpo", mpo), ("plain", plain))},
                   dpo_x_plain=ratio(rows[dpo.name], rows[plain.name]),
                   mpo_x_plain=ratio(rows[mpo.name], rows[plain.name]))

    stats = alternate([dpo, mpo, plain], warm, rounds, deadline=ctx.deadline, on_repeat=saved,
                      on_warm=lambda: graphs.update(warm=compiled_graphs()))
    rows = {loop.name: stats[loop.name].summary() for loop in (dpo, mpo, plain)}
    recompiles = compiled_graphs() - graphs["warm"]
    ctx.record(compiled_graphs=compiled_graphs(), recompiles_while_timed=recompiles)
    for loop in (dpo, mpo):
        check_finite(ctx, loop.name, [r.loss for r in stats[loop.name].repeats], loop.nonfinite)
        check_memory(ctx, loop.name, rows[loop.name]["peak_gib"], loop.estimate_gib)
    check_finite(ctx, plain.name, [r.loss for r in stats[plain.name].repeats])
    if not tiny:
        ctx.target("no recompilation while timed", recompiles == 0,
                   f"{recompiles} graph(s) built during {len(stats[dpo.name].repeats)} rounds")
    d, m, p = rows[dpo.name], rows[mpo.name], rows[plain.name]
    xd, xm = ratio(d, p), ratio(m, p)
    ctx.summary(f"DPO {_rate(d)} tokens/s{_memory(d, dpo.estimate_gib)}, {xd['x_plain']:.2f}x plain DPO "
                f"({xd['x_plain_min']:.2f}-{xd['x_plain_max']:.2f}); MPO {_rate(m)}{_memory(m, mpo.estimate_gib)}, "
                f"{xm['x_plain']:.2f}x; plain DPO {_rate(p)}{_memory(p)}; medians of {d['repeats']} alternated rounds")


def full14b(ctx: PartContext) -> None:
    """The InternVL-14B full 364 px step as one GPU of an 8-GPU FSDP2 run (``bench eval --parts full``)."""
    from internvl_tune.bench.eval_speed import bench_full_step

    row = bench_full_step(ctx.device, batch=2 if ctx.tiny else 32, steps=1 if ctx.tiny else 2,
                          image_size=28 if ctx.tiny else 364, tiny=ctx.tiny)
    ctx.record(**row)
    ctx.check("losses finite", row["full_losses_finite"], ", ".join(f"{p['loss']:.3f}" for p in row["full_points"]))
    first, second = row["full_points"]
    layers = f"{first['vit_layers']}+{first['qllama_layers']} and {second['vit_layers']}+{second['qllama_layers']}"
    if row["full_step_s_per_gpu"] > first["step_s"]:
        speed = (f"{row['full_images_per_s_per_gpu']:.1f} images/s, {row['full_step_s_per_gpu']:.2f} s per batch of "
                 f"{row['full_batch_per_gpu']}")
    else:  # the deeper model was not slower: timing noise (tiny models on a busy CPU), nothing to scale
        speed = "no scaled time (the deeper cut was not slower: noise)"
    memory = f"; estimated peak {row['full_estimate_gib_per_gpu_8_gpus']:.1f} GiB per GPU" if first["peak_gib"] else ""
    ctx.summary(f"one GPU of 8 (scaled from {layers} ViT+QLLaMA layers, eager, compute only): {speed}{memory}")
    target_at_most(ctx, "fits an 80 GB GPU in an 8-GPU run", row["full_estimate_gib_per_gpu_8_gpus"], 78.0, ".1f")


def auto(ctx: PartContext, shape: str = "internvl2-8b") -> None:
    """``--grad_checkpoint auto`` on InternVL2-8B LoRA r16: what it picks on this device, the estimate of that mode
    against the measured peak, and the speed."""
    from internvl_tune.bench.common import synthetic_samples
    from internvl_tune.bench.compare import alternate, schedule
    from internvl_tune.bench.ours import build_ours, packs_of

    tiny = ctx.tiny
    shape, rank, packed = ("tiny", 4, 512) if tiny else (shape, 16, 8192)
    samples = synthetic_samples(8, seed=0, tiles=(1, 2), text=(16, 64)) if tiny else synthetic_samples(32, seed=0)
    packs, _ = packs_of(samples, packed)
    peak = ctx.peak_tflops()
    loop = build_ours(shape, samples, ctx.device, packed, compile=not tiny, grad_checkpoint="auto", lora_rank=rank)
    ctx.record(shape=shape, picked=loop.extra["mode"], note=loop.extra["auto"], estimate_gib=loop.estimate_gib)
    warm, rounds = schedule(packs, 1 if tiny else 2, 1 if tiny else 2, 3)
    stats = alternate([loop], warm, rounds, deadline=ctx.deadline,
                      on_repeat=lambda s: ctx.record(ours=s[loop.name].summary(peak)))
    row = stats[loop.name].summary(peak)
    check_finite(ctx, loop.name, [r.loss for r in stats[loop.name].repeats], loop.nonfinite)
    check_memory(ctx, loop.name, row["peak_gib"], loop.estimate_gib)
    ctx.summary(f"{loop.extra['auto']}; {_rate(row)} tokens/s, MFU {row['mfu']:.1%}{_memory(row, loop.estimate_gib)}")


def script(ctx: PartContext, run: str, argv: list[str] | None = None, tiny_argv: list[str] | None = None) -> None:
    """A bench script's ``run(args) -> dict`` as a part: ``args`` is what the script's ``build_parser()`` makes of
    ``argv`` (``tiny_argv`` with ``--tiny``; without it the part is skipped on the CPU), or ``argv`` itself when the
    script has no parser. The dict is recorded; its ``losses`` (or ``loss``) must be finite and its ``peak_gib`` within
    ``estimate_gib`` + 15 % when it reports both."""
    import importlib

    if ctx.tiny and tiny_argv is None:
        raise Skip(f"{run} has no tiny form (give the entry tiny_argv)")
    module_name, _, name = run.partition(":")
    module = importlib.import_module(module_name)
    given = list(tiny_argv if ctx.tiny else argv or [])
    args = module.build_parser().parse_args(given) if hasattr(module, "build_parser") else given
    row = getattr(module, name)(args)
    ctx.record(**row)
    losses = row.get("losses", [row["loss"]] if "loss" in row else None)
    if losses is not None:
        check_finite(ctx, run, [float(x) for x in losses])
    if "peak_gib" in row and "estimate_gib" in row:
        check_memory(ctx, run, row["peak_gib"], row["estimate_gib"])
    ctx.summary(", ".join(f"{k} {v:,.4g}" for k, v in row.items() if isinstance(v, (int, float))
                          and not isinstance(v, bool))[:400])
