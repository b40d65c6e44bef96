"""Generate answers for held-out samples with an ``InternVLChat`` and score them against the references.

Generation goes through ``InternVLChat.generate`` (batched, left-padded prompts, KV cache), the model's one generation
entry, so whatever makes it faster makes this faster. Several processes: each takes a contiguous shard of the samples
(``eval/sharding.py``) and the rows are gathered back in sample order, so any number of processes writes the same
files. Used by ``internvl-tune eval chat`` and, for a few validation samples at each evaluation, by training
(``--eval_generate N``).

A row (one line of ``predictions.jsonl``): ``id`` (``dataset:line``), ``dataset``, ``kind``, ``prompt`` (the last
question), ``images`` (files), ``reference`` (``references`` too when several are accepted), ``prediction`` and
``scores``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from internvl_tune.data.loading import guarded_loader
from internvl_tune.errors import UserError
from internvl_tune.eval.caption.generate import EvalProgress
from internvl_tune.eval.chat.metrics import ANSWER_METRICS, TEXT_METRICS, mean_scores, score_answer, text_scores
from internvl_tune.eval.sharding import shard_range

OVERALL = "overall"


@dataclass
class GenerationSettings:
    """How answers are decoded (greedy unless ``temperature`` > 0)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1

    def kwargs(self, tokenizer, template, lockstep: bool = False) -> dict:
        """Keyword arguments of ``generate``: stop at the template's end of turn, pad with the tokenizer's pad.

        ``lockstep``: processes of a sharded model keep stepping until every process's answers have ended
        (transformers' ``synced_gpus``), so all run the same number of forward passes; the answers are unchanged.
        """
        stops = stop_token_ids(tokenizer, template)
        args = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "eos_token_id": stops,
                "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
                "do_sample": self.temperature > 0}
        if self.temperature > 0:
            args.update(temperature=self.temperature, top_p=self.top_p)
        if lockstep:
            args["synced_gpus"] = True
        return args


def stop_token_ids(tokenizer, template) -> list[int]:
    """Ids of the template's end-of-turn text and stop text (``<|im_end|>``, ``<|end|>``, ...), the tokenizer's EOS
    when the template has none (``plain``)."""
    ids = []
    for text in (template.sep.strip(), template.stop_str):
        if text:
            token = tokenizer.convert_tokens_to_ids(text)
            if token is not None and tokenizer.convert_ids_to_tokens(token) == text and token not in ids:
                ids.append(token)
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def collate_prompts(samples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(input_ids [B, L], attention_mask [B, L], pixel_values [T, 3, S, S] or None)``: prompts padded on the left
    (so every answer starts at the same position) and the real tiles in order (text samples' dummy tiles dropped)."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, longest - n:] = s["input_ids"]
        mask[row, longest - n:] = 1
    tiles = [s["pixel_values"][s["image_flags"].bool()] for s in samples]
    real = [t for t in tiles if len(t)]
    return ids, mask, torch.cat(real) if real else None


def cut_at_stop(tokens: list[int], stops: Sequence[int]) -> list[int]:
    """The tokens before the first stop token."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i]
    return tokens


def pick_samples(dataset, limit: int | None, spread: bool = False) -> list[int]:
    """Indices to evaluate: all; the first ``limit`` of each dataset; or (``spread``) ``limit`` spread evenly over
    the whole set (training's ``--eval_generate N``: every validation dataset gets its share)."""
    total = len(dataset)
    if limit is None or limit >= total and not spread:
        return list(range(total))
    if limit < 1:
        raise UserError(f"the number of samples to evaluate must be at least 1, got {limit}")
    if spread:
        n = min(limit, total)
        return sorted({round(k * (total - 1) / max(n - 1, 1)) for k in range(n)})
    starts = [int(s) for s in dataset.starts]
    return [i for begin, end in zip(starts, starts[1:]) for i in range(begin, min(end, begin + limit))]


@torch.no_grad()
def generate_answers(chat, dataset, indices: Sequence[int], settings: GenerationSettings, *, batch_size: int = 8,
                     num_workers: int = 0, rank: int = 0, world_size: int = 1,
                     gather: Callable[[list], list] | None = None, lockstep: bool = False,
                     show_progress: bool = True, description: str = "generating") -> list[dict]:
    """Generate an answer for each sample of ``indices`` (all processes pass the same list); rows in that order.

    Args:
        chat: an ``InternVLChat`` (``generate``, ``tokenizer``).
        dataset: a ``GenerationDataset`` built with ``chat.tokenizer``.
        indices: the samples to answer.
        settings: decoding.
        batch_size: prompts per ``generate`` call.
        num_workers: data-loader processes preparing the next prompts (tiling, tokenizing).
        rank, world_size: this process's shard (``shard_range``); ``gather`` concatenates per-rank lists in rank
            order on every rank (required when ``world_size > 1``).
        lockstep: processes share one sharded model (training under FSDP): every process makes the same number of
            calls, and each call steps until the answers of every process have ended.
    """
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if world_size > 1 and gather is None:
        raise ValueError("generate_answers needs a gather function when world_size > 1")
    shard = [indices[i] for i in shard_range(len(indices), rank, world_size)]
    batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    counted = len(batches)
    if lockstep:  # the same number of calls everywhere; extra calls repeat a sample and are dropped
        most = math.ceil(math.ceil(len(indices) / world_size) / batch_size)
        batches += [[indices[0]]] * (most - len(batches))
    tokenizer = chat.tokenizer
    stops = stop_token_ids(tokenizer, dataset.template)
    kwargs = settings.kwargs(tokenizer, dataset.template, lockstep)
    pad_id = kwargs["pad_token_id"]
    # a bad line stops with data check's one line, not a worker's traceback, whatever num_workers (data/loading.py)
    loader = guarded_loader(dataset, batches, list, num_workers)
    progress = EvalProgress(len(shard), description, show_progress, unit="samples")
    rows: list[dict] = []
    try:
        for n, loaded in enumerate(loader):
            if loaded.failure:
                raise UserError(loaded.failure)
            samples = loaded.batch
            ids, mask, pixels = collate_prompts(samples, pad_id)
            out = chat.generate(ids, pixels, mask, **kwargs)
            if n >= counted:
                continue
            for sample, tokens in zip(samples, out.tolist()):
                text = tokenizer.decode(cut_at_stop(tokens, stops), skip_special_tokens=True).strip()
                rows.append(_row(sample, text))
            progress.advance(len(samples))
    finally:
        progress.close()
    return gather(rows) if gather is not None else rows


def _row(sample: dict, prediction: str) -> dict:
    references = sample["references"]
    row = {"id": sample["sample_id"], "dataset": sample["dataset"], "kind": sample["kind"],
           "prompt": sample["question"], "images": sample["media"], "reference": references[0]}
    if len(references) > 1:
        row["references"] = references
    return {**row, "prediction": prediction}


def references_of(row: dict) -> list[str]:
    return row.get("references") or [row["reference"]]


def score_rows(rows: list[dict], text_metrics: bool = True) -> dict[str, dict]:
    """Score every row in place (``row["scores"]``) and return the means per dataset and ``overall``.

    Returns:
        ``{dataset: {"samples": n, "exact_match": ..., "relaxed_accuracy": ..., "anls": ..., "choice_accuracy": ...,
        "choice_samples": n, "bleu4": ..., "rouge_l": ..., "cider": ...}, ..., "overall": {...}}``; a metric that
        applies to no sample is None (choice accuracy without letter references; text metrics when off).
    """
    for row in rows:
        row["scores"] = score_answer(row["prediction"], references_of(row), row["prompt"])
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["dataset"], []).append(i)
    groups[OVERALL] = list(range(len(rows)))
    corpus: dict[str, dict[str, float]] = {}
    if text_metrics and rows:
        corpus, per_sample = text_scores([references_of(r) for r in rows], [r["prediction"] for r in rows], groups)
        for row, scores in zip(rows, per_sample):
            row["scores"].update(scores)
    summary = {}
    for group, members in groups.items():
        scored = [rows[i]["scores"] for i in members]
        means = mean_scores(scored, ANSWER_METRICS)
        summary[group] = {"samples": len(members), **means,
                          "choice_samples": sum(s["choice_accuracy"] is not None for s in scored),
                          **{name: corpus.get(group, {}).get(name) for name in TEXT_METRICS}}
    return summary


COLUMNS = ("exact_match", "relaxed_accuracy", "anls", "choice_accuracy", "bleu4", "rouge_l", "cider")


def summary_table(summaries: dict[str, dict[str, dict]]) -> str:
    """A plain-text table of the means: one row per dataset and model label (``model``, ``base``)."""
    header = f"{'dataset':<28} {'model':<6} {'n':>5} " + " ".join(f"{c:>16}" for c in COLUMNS)
    lines = [header, "-" * len(header)]
    groups = next(iter(summaries.values()))
    for group in groups:
        for label, summary in summaries.items():
            s = summary[group]
            cells = " ".join(f"{'-' if s[c] is None else f'{s[c]:.4f}':>16}" for c in COLUMNS)
            lines.append(f"{group:<28} {label:<6} {s['samples']:>5} {cells}")
    return "\n".join(lines)


def write_results(out_dir: str | Path, results: dict[str, tuple[list[dict], dict]], record: dict) -> tuple[Path, Path]:
    """``predictions.jsonl`` (the ``model`` rows; with a ``base``, its answer and scores beside each) and
    ``scores.json`` (``record`` plus each label's means) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, _ = results["model"]
    base_rows = results["base"][0] if "base" in results else None
    predictions = out / "predictions.jsonl"
    with predictions.open("w", encoding="utf-8") as fh:
        for k, row in enumerate(rows):
            if base_rows is not None:
                row = {**row, "base_prediction": base_rows[k]["prediction"], "base_scores": base_rows[k]["scores"]}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    scores = out / "scores.json"
    body = {**record, "metrics": results["model"][1]}
    if base_rows is not None:
        body["base_metrics"] = results["base"][1]
    scores.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    return predictions, scores


