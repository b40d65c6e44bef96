"""InternVL-14B (InternVL-C/G) speed on one GPU, random weights of the released shape, in one run:

1. retrieval embedding of ``--images`` images (224 px) and ``--captions`` captions (80 tokens), C and G modes;
2. a retrieval *head* fine-tune step (batch ``--batch``, 224 px): images/s and peak memory;
3. InternVL-G caption generation (5 beams, 8-30 new tokens): the reference-style batch-1 loop against batched
   generation, with the number of identical captions;
4. the *full* 364 px retrieval recipe's step (every parameter trains, drop path 0.3, activation checkpointing,
   batch 32 per GPU as the reference scripts): its fp32 master weights and AdamW moments (16 bytes a parameter,
   222 GB for 13.9B) fit only when sharded over 8 GPUs, and even its bf16 weights and gradients with activations
   (no batch of 8 or more) do not fit one 80 GB GPU. So it measures what one GPU of an 8-GPU FSDP2 run computes,
   on the model cut to 1/8 and 1/4 of its depth (6 + 4 and 12 + 8 of the 48 ViT + 32 QLLaMA layers): the
   forward + backward time and the activation memory are linear in depth (a constant for the embeddings, the heads
   and the loss, plus a cost per layer), so the two points give the full depth's by a straight line. Reported: the
   per-GPU step time and images/s of the full model (compute only: FSDP's gathers and reductions and the optimizer
   step are not in it), and the per-GPU peak of the 8-GPU run (sharded states + two gathered blocks + the scaled
   activations). Eager: compiling the two block kinds would cost more time than the measurement.

Run: ``python -m internvl_tune.bench.eval_speed`` on a GPU box; prints a table and writes ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from internvl_tune.cli.flags import description

SHAPE_14B = {
    "attn_pool_num_heads": 16, "clip_embed_dim": 768, "cross_attention_frequency": 2, "hidden_size": 4096,
    "num_query_token": 96,
    "vision": dict(hidden_size=3200, intermediate_size=12800, num_attention_heads=25, num_hidden_layers=48,
                   image_size=224, qk_normalization=True, qkv_bias=False),
    "qllama": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32,
                   vocab_size=49954, max_position_embeddings=2048),
}


def build_14b(device: torch.device, image_size: int = 224, drop_path_rate: float = 0.0, depth: float = 1.0,
              tiny: bool = False, dtype: torch.dtype = torch.bfloat16):
    """A random InternVL-14B-shaped model in ``dtype`` on ``device`` (position embeddings for ``image_size``), with
    ``depth`` of its ViT and QLLaMA layers; ``tiny``: the toy sizes of ``testing/tiny_cg.py`` (8 + 8 layers at full
    depth), for CPU tests."""
    from internvl_tune.models.internvl_cg.config import InternVLCGConfig
    from internvl_tune.models.internvl_cg.model import InternVLModel
    from internvl_tune.testing.tiny_cg import tiny_config_dict

    if tiny:
        d = tiny_config_dict(vocab_size=1000, image_size=28)
        layers = {"vision": 8, "qllama": 8}
    else:
        d = tiny_config_dict(vocab_size=SHAPE_14B["qllama"]["vocab_size"], image_size=224,
                             num_query_token=SHAPE_14B["num_query_token"])
        d.update({k: v for k, v in SHAPE_14B.items() if not isinstance(v, dict)})
        d["vision_config"].update(SHAPE_14B["vision"])
        d["qllama_config"].update(SHAPE_14B["qllama"])
        layers = {"vision": SHAPE_14B["vision"]["num_hidden_layers"], "qllama": SHAPE_14B["qllama"]["num_hidden_layers"]}
    d["vision_config"].update(drop_path_rate=drop_path_rate, num_hidden_layers=max(1, round(layers["vision"] * depth)))
    d["qllama_config"]["num_hidden_layers"] = max(1, round(layers["qllama"] * depth))
    base = d["vision_config"]["image_size"]
    d["force_image_size"] = image_size if image_size != base else None
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = InternVLModel(InternVLCGConfig.from_dict(d))
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # the model leaves it to the checkpoint (torch.empty): random memory, NaN at times
        model.text_projection.normal_(std=model.text_projection.shape[0] ** -0.5)
    return model.eval()


def _sync(device: torch.device | None = None):
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize()


def bench_embedding(model, n_images: int, n_captions: int, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for mode in ("InternVL-C", "InternVL-G"):
        _sync()
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n_images, 128):
                px = torch.randn(min(128, n_images - i), 3, 224, 224, device=device, generator=g, dtype=torch.bfloat16)
                model.encode_image(px, mode)
        _sync()
        out[f"images_per_s_{mode}"] = n_images / (time.perf_counter() - start)
    _sync()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n_captions, 512):
            ids = torch.randint(3, 49000, (min(512, n_captions - i), 80), device=device, generator=g)
            model.encode_text(ids)
    _sync()
    out["captions_per_s"] = n_captions / (time.perf_counter() - start)
    out["seconds_1k_images_5k_captions_G"] = 1000 / out["images_per_s_InternVL-G"] + 5000 / out["captions_per_s"]
    return out


def bench_head_finetune(model, batch: int, steps: int, device) -> dict:
    from internvl_tune.data.retrieval import RetrievalBatch
    from internvl_tune.dist import init_distributed
    from internvl_tune.dist.parallelize import parallelize
    from internvl_tune.models.internvl_cg.recipe import RetrievalTrainModule
    from internvl_tune.train.optim import fp32_master_weights

    init_distributed("cuda")
    model.requires_grad_(False)
    for p in (model.text_projection, model.qllama.lm_head.weight, model.qllama.model.embed_tokens.weight):
        p.requires_grad_(True)
    fp32_master_weights(model)
    step_module = RetrievalTrainModule(model, gather_fn=lambda x: x).train()
    parallelize(step_module, step_module.blocks(), world_size=1, param_dtype=torch.bfloat16, grad_checkpoint=1.0)
    opt = torch.optim.AdamW([p for p in step_module.parameters() if p.requires_grad], lr=1e-6, fused=True)
    g = torch.Generator(device=device).manual_seed(1)

    def make():
        ids = lambda: torch.randint(3, 49000, (batch, 80), device=device, generator=g)  # noqa: E731
        mask = torch.ones(batch, 80, dtype=torch.long, device=device)
        return RetrievalBatch(
            pixel_values=torch.randn(batch, 3, 224, 224, device=device, generator=g, dtype=torch.bfloat16),
            negative_input_ids=ids(), negative_attention_mask=mask, positive_input_ids=ids(),
            positive_attention_mask=mask, summarize_input_ids=ids(), summarize_attention_mask=mask,
            image_ids=torch.arange(batch, device=device), work=batch)

    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        if i == 2:
            _sync()
            start = time.perf_counter()
        loss = step_module(make())["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync()
    trainable = sum(p.numel() for p in step_module.parameters() if p.requires_grad)
    return {"head_images_per_s": batch * steps / (time.perf_counter() - start),
            "head_peak_gib": torch.cuda.max_memory_allocated() / 2**30, "head_trainable_params": trainable,
            "head_loss": float(loss)}


def bench_captions(model, n_images: int, batch: int, device, n_single: int | None = None) -> dict:
    g = torch.Generator(device=device).manual_seed(2)
    images = torch.randn(n_images, 3, 224, 224, device=device, generator=g, dtype=torch.bfloat16)
    prompt = torch.tensor([[1, 4521, 4473, 29901]], device=device)  # BOS + a 3-token prompt
    kw = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
    with torch.no_grad():
        model.generate(images[:1], prompt, torch.ones_like(prompt), **kw)  # warm-up
        _sync()
        start = time.perf_counter()
        n_single = n_single or n_images  # the batch-1 loop may time a prefix; its captions are compared
        single = [model.generate(images[i : i + 1], prompt, torch.ones_like(prompt), **kw)[0] for i in range(n_single)]
        _sync()
        t_single = time.perf_counter() - start
        start = time.perf_counter()
        batched = []
        for i in range(0, n_images, batch):
            n = min(batch, n_images - i)
            out = model.generate(images[i : i + n], prompt.expand(n, -1), torch.ones(n, prompt.shape[1], device=device,
                                 dtype=torch.long), **kw)
            batched.extend(out)
        _sync()
        t_batched = time.perf_counter() - start

    def strip(t):
        t = t.tolist()
        return t[: t.index(2) + 1] if 2 in t else [x for x in t if x != 0]

    same = sum(strip(a) == strip(b) for a, b in zip(single, batched))
    single_rate, batched_rate = n_single / t_single, n_images / t_batched
    return {"caption_batch": batch, "caption_images_per_s_batch1": single_rate, "caption_images_per_s_batched": batched_rate,
            "caption_speedup": batched_rate / single_rate, "caption_identical": f"{same}/{n_single}"}


def eight_gpu_gib(params: int, activations_gib: float, gpus: int = 8) -> float:
    """Per-GPU peak of full fine-tuning over ``gpus`` GPUs with FSDP2: fp32 master weights, gradients and AdamW
    moments sharded (16 bytes a parameter / gpus), about two gathered bf16 blocks (of 48 + 32: ~2/48 of the model),
    and one GPU's activations."""
    return 16 * params / gpus / 2**30 + 2 * 2 * params / 48 / 2**30 + activations_gib


def linear_fit(xs: list[float], ys: list[float], x: float) -> float:
    """The straight line through two points ``(xs, ys)``, at ``x``."""
    (x0, x1), (y0, y1) = xs, ys
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def bench_full_step(device: torch.device, batch: int = 32, depths=(0.125, 0.25), steps: int = 2,
                    image_size: int = 364, tiny: bool = False) -> dict:
    """The full-recipe step of one GPU of an 8-GPU run, from two reduced depths (item 4 of the module docstring)."""
    from internvl_tune.data.retrieval import RetrievalBatch
    from internvl_tune.dist.parallelize import apply_activation_checkpointing
    from internvl_tune.models.internvl_cg.recipe import RetrievalTrainModule

    cuda = device.type == "cuda"
    points = []
    for depth in depths:
        dtype = torch.bfloat16 if cuda else torch.float32  # (bf16 matmuls are slow on CPUs)
        model = build_14b(device, image_size, drop_path_rate=0.3, depth=depth, tiny=tiny, dtype=dtype).train()
        cfg = model.config
        params = sum(p.numel() for p in model.parameters())
        module = RetrievalTrainModule(model, gather_fn=lambda x: x)
        apply_activation_checkpointing(module, module.blocks(), 1.0)
        vocab = cfg.qllama_config.vocab_size
        g = torch.Generator(device=device).manual_seed(3)
        ids = lambda: torch.randint(3, vocab - 1, (batch, 80), device=device, generator=g)  # noqa: E731
        mask = torch.ones(batch, 80, dtype=torch.long, device=device)
        data = RetrievalBatch(torch.randn(batch, 3, image_size, image_size, device=device, generator=g, dtype=dtype),
                              ids(), mask, ids(), mask, ids(), mask, torch.arange(batch, device=device), work=batch)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for i in range(steps + 1):
            if i == 1:
                _sync(device)
                start = time.perf_counter()
            loss = module(data)["loss"]
            loss.backward()
            module.zero_grad(set_to_none=False)  # keep the bf16 gradients allocated, as a real step would
        _sync(device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        points.append({"depth": depth, "vit_layers": cfg.vision_config.num_hidden_layers,
                       "qllama_layers": cfg.qllama_config.num_hidden_layers, "params": params,
                       "step_s": (time.perf_counter() - start) / steps, "peak_gib": peak,
                       "activations_gib": peak - 2 * 2 * params / 2**30 if cuda else 0.0, "loss": float(loss.detach())})
        del model, module, data
        if cuda:
            torch.cuda.empty_cache()
    at = [p["depth"] for p in points]
    params = round(linear_fit(at, [p["params"] for p in points], 1.0))
    seconds = linear_fit(at, [p["step_s"] for p in points], 1.0)
    activations = linear_fit(at, [p["activations_gib"] for p in points], 1.0)
    return {"full_image_size": image_size, "full_batch_per_gpu": batch, "full_points": points,
            "full_params_scaled": params, "full_step_s_per_gpu": seconds, "full_images_per_s_per_gpu": batch / seconds,
            "full_activations_gib": activations,
            "full_estimate_gib_per_gpu_8_gpus": eight_gpu_gib(params, activations) if cuda else 0.0,
            "full_losses_finite": all(math.isfinite(p["loss"]) for p in points)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images to embed for retrieval (default: 1000)")
    parser.add_argument("--captions", type=int, default=5000, help="captions to embed for retrieval (default: 5000)")
    parser.add_argument("--batch", type=int, default=32, help="head fine-tune batch (default: 32)")
    parser.add_argument("--steps", type=int, default=6,
                        help="timed head fine-tune steps, after 2 untimed warm-up steps (default: 6)")
    parser.add_argument("--caption_images", type=int, default=32, help="images to caption (default: 32)")
    parser.add_argument("--caption_batch", type=int, default=32, help="images per batched generate call (default: 32)")
    parser.add_argument("--caption_single", type=int, default=None, help="images in the batch-1 loop (default: all)")
    parser.add_argument("--parts", default="embed,caption,head",
                        help="comma list of the parts to run: embed, caption, head, full (default: the first three)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (rewritten after each part)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda")
    parts = args.parts.split(",")
    row = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    if parts == ["full"]:  # its own 364 px model; the 224 px one is not built
        row.update(bench_full_step(device))
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(row, indent=2))
        return 0
    model = build_14b(device)
    row["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    for name, fn in (("embed", lambda: bench_embedding(model, args.images, args.captions, device)),
                     ("caption", lambda: bench_captions(model, args.caption_images, args.caption_batch, device,
                                                         args.caption_single)),
                     ("head", lambda: bench_head_finetune(model, args.batch, args.steps, device))):
        if name not in parts:
            continue
        try:
            row.update(fn())
        except Exception as exc:  # keep the other parts' numbers
            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    import os

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    raise SystemExit(main())
