"""InternVL-14B (InternVL-C/G) speed on one GPU, random weights of the released shape, in one run:

1. retrieval embedding of ``--images`` images (224 px) and ``--captions`` captions (80 tokens), C and G modes;
2. a retrieval *head* fine-tune step (batch ``--batch``, 224 px): images/s and peak memory;
3. InternVL-G caption generation (5 beams, 8-30 new tokens): the reference-style batch-1 loop against batched
   generation, with the number of identical captions;
4. the *full* 364 px retrieval recipe's step (every parameter trains, drop path 0.3, activation checkpointing): the
   forward and backward of the largest batch that fits one GPU, with bf16 gradients. Its fp32 master weights and
   AdamW moments (16 bytes a parameter, 222 GB for 13.9B) cannot fit one GPU; the memory of the 8-GPU run (FSDP2
   shards them) is estimated from the measured activations.

Run: ``python -m internvl_tune.bench.eval_speed`` on a GPU box; prints a table and writes ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import json
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


def build_14b(device: torch.device, image_size: int = 224, drop_path_rate: float = 0.0):
    """A random InternVL-14B-shaped model in bf16 on ``device`` (position embeddings for ``image_size``)."""
    from internvl_tune.models.internvl_cg.config import InternVLCGConfig
    from internvl_tune.models.internvl_cg.model import InternVLModel
    from internvl_tune.testing.tiny_cg import tiny_config_dict

    d = tiny_config_dict(vocab_size=SHAPE_14B["qllama"]["vocab_size"], image_size=224,
                         num_query_token=SHAPE_14B["num_query_token"])
    d.update({k: v for k, v in SHAPE_14B.items() if not isinstance(v, dict)})
    d["vision_config"].update(SHAPE_14B["vision"], drop_path_rate=drop_path_rate)
    d["qllama_config"].update(SHAPE_14B["qllama"])
    d["force_image_size"] = image_size if image_size != 224 else None
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = InternVLModel(InternVLCGConfig.from_dict(d))
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _sync():
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


def bench_full_step(device, batches=(64, 48, 32, 24, 16, 8), steps: int = 3, image_size: int = 364) -> dict:
    """The full-recipe step at ``image_size``: the largest batch of ``batches`` whose forward and backward fit."""
    from internvl_tune.data.retrieval import RetrievalBatch
    from internvl_tune.dist import init_distributed
    from internvl_tune.dist.parallelize import parallelize
    from internvl_tune.models.internvl_cg.recipe import RetrievalTrainModule

    init_distributed("cuda")
    model = build_14b(device, image_size, drop_path_rate=0.3).train()
    params = sum(p.numel() for p in model.parameters())
    module = RetrievalTrainModule(model, gather_fn=lambda x: x)
    parallelize(module, module.blocks(), world_size=1, param_dtype=None, grad_checkpoint=1.0)
    g = torch.Generator(device=device).manual_seed(3)
    for batch in batches:
        try:
            ids = lambda: torch.randint(3, 49000, (batch, 80), device=device, generator=g)  # noqa: E731
            mask = torch.ones(batch, 80, dtype=torch.long, device=device)
            data = RetrievalBatch(torch.randn(batch, 3, image_size, image_size, device=device, generator=g,
                                              dtype=torch.bfloat16), ids(), mask, ids(), mask, ids(), mask,
                                  torch.arange(batch, device=device), work=batch)
            torch.cuda.reset_peak_memory_stats()
            for i in range(steps + 1):
                if i == 1:
                    _sync()
                    start = time.perf_counter()
                module(data)["loss"].backward()
                module.zero_grad(set_to_none=False)  # keep the bf16 gradients allocated, as a real step would
            _sync()
            seconds = (time.perf_counter() - start) / steps
            peak = torch.cuda.max_memory_allocated() / 2**30
            break
        except torch.OutOfMemoryError:
            module.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    else:
        return {"full_error": f"no batch of {batches} fits"}
    weights_and_grads = 2 * 2 * params / 2**30  # bf16 weights + bf16 gradients held during the measured step
    activations = peak - weights_and_grads
    eight = 16 * params / 8 / 2**30 + 2 * 2 * params / 48 / 2**30 + activations  # states/8 + ~2 gathered blocks + acts
    return {"full_image_size": image_size, "full_batch_per_gpu": batch, "full_step_s": seconds,
            "full_images_per_s": batch / seconds, "full_peak_gib_bf16_grads": peak,
            "full_activations_gib": activations, "full_estimate_gib_per_gpu_8_gpus": eight}


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
