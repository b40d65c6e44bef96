"""GRPO rollout speed: our generation (``models/internvl_chat/generation.py``) against transformers' ``generate`` on
the same random-weight model, prompts and sampling settings in the same run, and one GRPO step's split between
generating the completions and updating the policy on them.

    internvl-tune bench grpo --shape internvl2-2b --out bench_grpo.json      (GPU)
    internvl-tune bench grpo --tiny                                           (CPU smoke test, as CI runs it)

Both generators sample ``--num_generations`` completions of exactly ``--max_completion_length`` tokens (no stop
token) for each of ``--prompts`` prompts (``--tiles`` 448 px tiles + ``--prompt_tokens`` text tokens each),
temperature 1; rollout tokens/s = completions x tokens / seconds, the median of ``--repeats`` timed calls after one
warm-up (ours compiles its static decode step there; transformers runs as ``generate`` does by default). The step:
LoRA ``--lora_rank`` on the LLM, every block checkpointed and compiled (GPU), one micro-batch per prompt (its
completions packed in one row), fused AdamW; generation then update, timed apart. ``run(args)`` returns the numbers
(``bench verify`` calls it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from internvl_tune.bench.common import SyntheticSample, materialize
from internvl_tune.bench.shapes import SHAPES, native_config
from internvl_tune.cli.flags import description

TINY = dict(shape="tiny", prompts=2, num_generations=4, prompt_tokens=16, tiles=1, max_completion_length=8, repeats=1,
            steps=1, device="cpu")


def build_chat(shape: str, device: torch.device, dtype: torch.dtype):
    """An ``InternVLChat`` of ``shape`` with random weights on ``device``."""
    from internvl_tune.dist.parallelize import to_empty_keeping_buffers
    from internvl_tune.models.internvl_chat.chat import InternVLChat
    from internvl_tune.models.internvl_chat.config import original_from_native
    from internvl_tune.models.internvl_chat.loading import build_empty_model

    cfg = native_config(shape)
    model = build_empty_model(cfg)
    to_empty_keeping_buffers(model, device)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.full_like(p, float("norm" in name)) if p.ndim == 1 else
                    0.02 * torch.randn(p.shape, device=device, generator=gen))
    model.to(dtype).eval()
    # token ids come in directly: a stand-in tokenizer only names the image token's id
    tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda token: cfg.image_token_id, pad_token_id=0)
    return InternVLChat(model, tokenizer, original_from_native(cfg.to_dict()))


def prompt_batches(chat, prompts: int, tiles: int, text: int) -> list:
    """One micro-batch per prompt (as a GRPO step holds them), each a ``PromptBatch``."""
    from internvl_tune.data.prompts import PromptCollator

    cfg = chat.model.config
    collate = PromptCollator(0, cfg.image_token_id, chat.num_image_token)
    out = []
    for i in range(prompts):
        sample = materialize(SyntheticSample(tiles, text), cfg.image_token_id, cfg.text_config.vocab_size, seed=i)
        sample.update(index=i, where=f"synthetic:{i}", prompt="", fields={})
        out.append(collate([sample]))
    return out


def _embed(chat, batch, device, dtype):
    batch = batch.to(device)
    return chat.embed_inputs(batch.input_ids, batch.pixel_values.to(dtype), layout={
        "image_tiles": batch.image_tiles, "image_positions": batch.image_positions}), batch.attention_mask


def _timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def generation_speed(chat, batches, args, device, dtype) -> dict:
    """Rollout tokens/s of ours and of transformers' ``generate`` on the same prompts (all in one batch)."""
    from internvl_tune.models.internvl_chat.generation import Generator, Sampling, stream_key

    g, n = args.num_generations, args.max_completion_length
    parts = [_embed(chat, b, device, dtype) for b in batches]
    length = max(e.shape[1] for e, _ in parts)  # left-pad every prompt to the longest
    embeds = torch.cat([torch.nn.functional.pad(e, (0, 0, length - e.shape[1], 0)) for e, _ in parts])
    mask = torch.cat([torch.nn.functional.pad(m, (length - m.shape[1], 0)) for _, m in parts])
    cuda = device.type == "cuda"
    sampling = Sampling(n, temperature=1.0, suppress_token_ids=(chat.img_context_token_id,))
    keys = torch.tensor([stream_key(0, p, k) for p in range(len(batches)) for k in range(g)], device=device)
    ours = Generator(chat.model, static=cuda, compile=cuda)
    ours_s, out = _timed(lambda: ours.generate(embeds, mask, sampling, keys, repeats=g), args.repeats, device)
    rows = embeds.shape[0] * g

    def transformers_generate():
        return chat.model.generate(inputs_embeds=embeds.repeat_interleave(g, 0),
                                   attention_mask=mask.repeat_interleave(g, 0), do_sample=True, temperature=1.0,
                                   top_p=1.0, top_k=0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    with torch.no_grad(), warnings.catch_warnings():  # transformers' generate warns about its own layer calls
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        theirs_s, theirs = _timed(transformers_generate, args.repeats, device)
    if out.tokens.shape != (rows, n) or theirs.shape != (rows, n):  # both must have generated the same work
        raise RuntimeError(f"generated {tuple(out.tokens.shape)} and {tuple(theirs.shape)} tokens, not {(rows, n)}")
    return {"ours_tokens_per_s": rows * n / ours_s, "transformers_tokens_per_s": rows * n / theirs_s,
            "speedup": theirs_s / ours_s, "ours_s": ours_s, "transformers_s": theirs_s,
            "cache": "static, compiled decode" if cuda else "dynamic"}


def step_split(chat, batches, args, device, dtype) -> dict:
    """Seconds of a GRPO step's generation and of its update (LoRA, the trainer's parallelize and step)."""
    from internvl_tune.data.batching import ChatCollator
    from internvl_tune.dist import init_distributed
    from internvl_tune.dist.parallelize import gathered, parallelize
    from internvl_tune.models.internvl_chat.generation import Generator, Sampling, stream_key
    from internvl_tune.models.internvl_chat.lora import add_lora
    from internvl_tune.models.internvl_chat.objectives.grpo import GRPOTrainModule, MicroRollout, training_batch
    from internvl_tune.models.internvl_chat.objectives.grpo_loss import GRPOArgs
    from internvl_tune.train.optim import build_adamw, build_param_groups, fp32_master_weights
    from internvl_tune.train.schedule import LRSchedule
    from internvl_tune.train.step import StepRunner

    cuda = device.type == "cuda"
    grpo = GRPOArgs(num_generations=args.num_generations, max_completion_length=args.max_completion_length).resolve()
    chat.model.requires_grad_(False)
    add_lora(chat, llm_rank=args.lora_rank, lora_dropout=0.0)
    module = GRPOTrainModule(chat, grpo)
    fp32_master_weights(module)
    info = init_distributed(device.type)
    parallelize(module, module.blocks(), world_size=1, param_dtype=dtype if cuda else None, grad_checkpoint=1.0,
                compile=cuda)
    stepper = StepRunner(module, build_adamw(build_param_groups(module.named_parameters(), 1e-5, 0.0),
                                             (0.9, 0.999), 1e-8), LRSchedule("constant", 0, 10**6), info, 1.0)
    generator = Generator(module.model, static=cuda, compile=cuda)
    sampling = Sampling(args.max_completion_length, temperature=1.0, suppress_token_ids=(chat.img_context_token_id,))
    collator = ChatCollator(True, 0, chat.img_context_token_id, chat.num_image_token)
    tokens = len(batches) * args.num_generations * args.max_completion_length
    scales = (1.0 / tokens, 1.0 / tokens)  # dapo: the weight is the token count
    rows, losses = [], []
    for step in range(args.steps + 1):  # the first step compiles
        sync = torch.cuda.synchronize if cuda else (lambda *a: None)
        start = time.perf_counter()
        module.eval()
        micro = []
        with gathered(module), torch.no_grad():
            for p, batch in enumerate(batches):
                embeds, mask = _embed(chat, batch, device, dtype)
                keys = torch.tensor([stream_key(step, p, k) for k in range(args.num_generations)], device=device)
                out = generator.generate(embeds, mask, sampling, keys, repeats=args.num_generations)
                ids = [r[: int(n)] for r, n in zip(out.tokens.cpu().tolist(), out.lengths.cpu())]
                advantages = torch.randn(len(ids), generator=torch.Generator().manual_seed(step * 1000 + p))
                micro.append(MicroRollout(ids, advantages.tolist()))
        module.train()
        sync()
        generated = time.perf_counter() - start
        train = [training_batch(b, m, grpo, collator, scales) for b, m in zip(batches, micro)]
        for b in train:
            b.pixel_values = b.pixel_values.to(dtype)
        losses.append(stepper(train, step).result()["loss"])
        sync()
        rows.append((generated, time.perf_counter() - start - generated))
    generation_s, update_s = rows[-1]
    return {"step_generation_s": generation_s, "step_update_s": update_s,
            "generation_share": generation_s / (generation_s + update_s), "losses": losses,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0}


def run(args) -> dict:
    """The benchmark's numbers (a dict; ``bench verify`` and :func:`main` call it). ``args`` as :func:`build_parser`
    gives, or any object with those attributes."""
    import transformers

    from internvl_tune.errors import UserError

    if getattr(args, "tiny", False):
        args = SimpleNamespace(**{**vars(args), **TINY})
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("`bench grpo` measures GPU speed and needs a CUDA device; none is visible here (--tiny runs a "
                        "tiny shape on the CPU)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    chat = build_chat(args.shape, device, dtype)
    batches = prompt_batches(chat, args.prompts, args.tiles, args.prompt_tokens)
    row = {"shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "prompts": args.prompts,
           "num_generations": args.num_generations, "prompt_tokens": int(batches[0].input_ids.shape[1]),
           "completion_tokens": args.max_completion_length, "date": time.strftime("%Y-%m-%d")}
    row.update(generation_speed(chat, batches, args, device, dtype))
    row.update(step_split(chat, batches, args, device, dtype))
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internvl-tune bench grpo", description=description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="internvl2-2b", choices=sorted(SHAPES), help="architecture to build")
    parser.add_argument("--prompts", type=int, default=8, help="prompts of the step (one micro-batch each)")
    parser.add_argument("--num_generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--prompt_tokens", type=int, default=256, help="text tokens per prompt (besides the tiles)")
    parser.add_argument("--tiles", type=int, default=1, help="448 px tiles per prompt (256 image tokens each)")
    parser.add_argument("--max_completion_length", type=int, default=512, help="tokens per completion")
    parser.add_argument("--repeats", type=int, default=3, help="timed generation calls of each kind (median)")
    parser.add_argument("--steps", type=int, default=2, help="timed GRPO steps (after one that compiles)")
    parser.add_argument("--lora_rank", type=int, default=16, help="LoRA rank on the LLM for the update")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a small shape")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU, seconds (the CI smoke test)")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    row = run(build_parser().parse_args(argv))
    print(f"{row['shape']} on {row['device']}: {row['prompts']} prompts x {row['num_generations']} completions x "
          f"{row['completion_tokens']} tokens; rollout tokens/s ours {row['ours_tokens_per_s']:.0f} "
          f"({row['cache']}), transformers generate {row['transformers_tokens_per_s']:.0f}: {row['speedup']:.2f}x; "
          f"GRPO step {row['step_generation_s']:.2f} s generation + {row['step_update_s']:.2f} s update "
          f"({row['generation_share']:.0%} generating)")
    args = build_parser().parse_args(argv)
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
