"""Zero-shot image-text retrieval: embeddings in batches, recall@k exactly as clip_benchmark defines it.

* ``image_retrieval_recall@k`` (text -> image): for each caption, a hit when its image is among the k images with the
  highest similarity; the mean over captions.
* ``text_retrieval_recall@k`` (image -> text): for each image, a hit when any of its captions is among the k captions
  with the highest similarity; the mean over images.

Top-k uses ``torch.topk`` per k on rows of the similarity matrix, as clip_benchmark does (so ties break the same way).
The matrix is never built whole: rows are computed in chunks on the device from the normalised embeddings, so 25k
captions x 5k images fit in a few hundred MB.

Several processes: each embeds a contiguous shard of the images (and their captions); ``gather_fn`` concatenates
the shards in rank order, then every rank scores the full set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from internvl_tune.data.images import load_image
from internvl_tune.data.retrieval import READERS, RetrievalEvalSet, eval_transform, reader_for
from internvl_tune.errors import UserError
from internvl_tune.eval.sharding import shard_range


# ----------------------------------------------------------------------------------------------- the benchmarks
def coco_image_dir(annotation: Path, split: str, language: str) -> str:
    """COCO's image folder under the dataset root: clip_benchmark's captions-format file (``images`` +
    ``annotations``) names images inside the split's folder; the Karpathy list (and COCO-CN) names ``val2014/...``."""
    data = json.loads(annotation.read_text(encoding="utf-8"))
    return ("val2014" if split in ("val", "test") else "train2014") if isinstance(data, dict) and language != "cn" else ""


@dataclass(frozen=True)
class RetrievalBenchmark:
    """One retrieval test set in clip_benchmark's layout under ``--dataset_root``, in the shape of the caption
    (``eval/caption/datasets.py``) and chat (``eval/chat/datasets.py``) tables.

    ``annotations`` maps a language to the candidate files (the first that exists is read; ``{split}`` is
    ``--split``); ``image_dir`` is the images' folder under the root, or a function of (annotation, split, language)
    for layouts that depend on the file.
    """

    name: str
    format: str  # a key of data.retrieval.READERS
    annotations: dict[str, tuple[str, ...]]
    image_dir: str | Callable[[Path, str, str], str] = ""
    aliases: tuple[str, ...] = ()

    def eval_set(self, root: str | Path, split: str, language: str, annotation_file: str = "") -> RetrievalEvalSet:
        if language not in self.annotations:
            raise UserError(f"{self.name} has no {language!r} annotations; --language one of "
                            f"{', '.join(self.annotations)}")
        root = Path(root)
        candidates = [Path(annotation_file)] if annotation_file else \
            [root / c.format(split=split) for c in self.annotations[language]]
        annotation = next((c for c in candidates if c.is_file()), candidates[0])
        if not annotation.is_file():
            raise UserError(f"{annotation} not found: the {self.name} annotation ({language}, {split}) is expected "
                            "there — check --dataset_root / --annotation_file (docs/retrieval.md has the downloads)")
        folder = self.image_dir(annotation, split, language) if callable(self.image_dir) else self.image_dir
        return READERS[self.format].eval_set(annotation, root / folder)


BENCHMARKS: dict[str, RetrievalBenchmark] = {b.name: b for b in (
    RetrievalBenchmark("flickr30k", "flickr_format", {"en": ("flickr30k_{split}_karpathy.txt",),
                                                      "cn": ("flickr30k_cn_{split}.txt",)}, "Images"),
    RetrievalBenchmark("coco", "coco_format", {"en": ("annotations/coco_karpathy_{split}.json",
                                                      "coco_{split}_karpathy.json"),
                                               "cn": ("coco-cn_{split}.json",)}, coco_image_dir,
                       aliases=("mscoco_captions",)),
)}


def resolve_dataset(name: str, root: str, split: str, language: str, annotation_file: str = "",
                    registry: dict | None = None) -> RetrievalEvalSet:
    """The test set called ``name``: a custom dataset of ``registry`` (``--datasets_file``: its root and
    annotation, read by the format its name carries), or a benchmark of :data:`BENCHMARKS` (or an alias) under
    ``root``."""
    registry = registry or {}
    if name in registry:
        spec = registry[name]
        return reader_for(name).eval_set(annotation_file or spec["annotation"], spec["root"])
    bench = next((b for b in BENCHMARKS.values() if name == b.name or name in b.aliases), None)
    if bench is None:
        names = ", ".join(f"{b.name}" + (f" (alias {', '.join(b.aliases)})" if b.aliases else "")
                          for b in BENCHMARKS.values())
        raise UserError(f"unknown dataset {name!r}: use {names}, or register a custom "
                        f"{' / '.join('*_' + k for k in READERS)} dataset with --datasets_file")
    return bench.eval_set(root, split, language, annotation_file)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.no_grad()
def compute_embeddings(
    model,
    dataset: RetrievalEvalSet,
    tokenize: Callable[[list[str]], torch.Tensor],
    mode: str,
    image_size: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp: bool = True,
    rank: int = 0,
    world_size: int = 1,
    gather_fn: Callable[[torch.Tensor], torch.Tensor] = _identity,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``(image_emb [I, D], text_emb [T, D])`` in dataset order (fp32, on ``device``).

    Args:
        model: an ``InternVLModel`` (``encode_image(x, mode)``, ``encode_text(ids)``).
        dataset: images and their captions.
        tokenize: captions -> padded ids (``'summarize:'`` prefix, pad 0).
        mode: ``"InternVL-C"`` or ``"InternVL-G"``.
        image_size: input resolution (bicubic resize, no crop).
        batch_size: images per forward; their captions go through in the same step.
        amp: autocast to the model's dtype on CUDA (as clip_benchmark's ``--amp``).
        rank / world_size: this process's shard of the images.
        gather_fn: concatenates a tensor over ranks in rank order (sizes may differ); identity on one process.
        progress: called with (images done, images in this shard).
    """
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    autocast = torch.autocast("cuda", dtype=dtype) if amp and device.type == "cuda" and dtype != torch.float32 else nullcontext()
    shard = shard_range(len(dataset.image_paths), rank, world_size)
    images, texts = [], []
    for start in range(shard.start, shard.stop, batch_size):
        idx = range(start, min(start + batch_size, shard.stop))
        pixels = torch.stack([eval_transform(load_image(dataset.image_paths[i], where=dataset.image_paths[i]), image_size)
                              for i in idx]).to(device, dtype)
        ids = tokenize([c for i in idx for c in dataset.captions[i]]).to(device)
        with autocast:
            images.append(F.normalize(model.encode_image(pixels, mode).float(), dim=-1))
            texts.append(F.normalize(model.encode_text(ids).float(), dim=-1))
        if progress:
            progress(idx.stop - shard.start, len(shard))
    dim = model.config.clip_embed_dim
    local_images = torch.cat(images) if images else torch.zeros(0, dim, device=device)
    local_texts = torch.cat(texts) if texts else torch.zeros(0, dim, device=device)
    return gather_fn(local_images), gather_fn(local_texts)


def hits_at_k(
    queries: torch.Tensor, keys: torch.Tensor, positives: Callable[[range], torch.Tensor], ks: list[int], chunk: int
) -> dict[int, torch.Tensor]:
    """For each query row, whether any positive key is in its top-k by dot product; ``{k: bool [Nq]}``.

    ``positives(rows)`` returns the boolean ``[len(rows), Nk]`` positive mask of those query rows.
    """
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, queries.shape[0], chunk):
        rows = range(start, min(start + chunk, queries.shape[0]))
        scores = queries[rows.start : rows.stop] @ keys.t()
        pos = positives(rows)
        for k in ks:
            top = torch.topk(scores, min(k, scores.shape[1]), dim=1).indices
            out[k].append(pos.gather(1, top).any(dim=1))
    return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool) for k, v in out.items()}


def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, ks: list[int], chunk: int = 1024
) -> dict[str, float]:
    """clip_benchmark's metrics from normalised embeddings.

    Args:
        image_emb: ``[I, D]``; text_emb: ``[T, D]`` (same device).
        text_to_image: ``[T]`` index of each caption's image.
        ks: recall cut-offs, e.g. ``[1, 5, 10]``.
        chunk: query rows scored at once.

    Returns:
        ``{"image_retrieval_recall@k": ..., "text_retrieval_recall@k": ...}`` for every k, in that order.
    """
    text_to_image = text_to_image.to(image_emb.device)
    num_images = image_emb.shape[0]
    image_ids = torch.arange(num_images, device=image_emb.device)

    def t2i_positives(rows: range) -> torch.Tensor:  # caption rows -> their one image
        return text_to_image[rows.start : rows.stop, None] == image_ids[None, :]

    def i2t_positives(rows: range) -> torch.Tensor:  # image rows -> all their captions
        return torch.arange(rows.start, rows.stop, device=image_emb.device)[:, None] == text_to_image[None, :]

    t2i = hits_at_k(text_emb, image_emb, t2i_positives, ks, chunk)
    i2t = hits_at_k(image_emb, text_emb, i2t_positives, ks, chunk)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = t2i[k].float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = i2t[k].float().mean().item()
    return metrics


def evaluate_retrieval(model, dataset: RetrievalEvalSet, tokenize, mode: str, image_size: int, ks: list[int],
                       **embedding_kwargs) -> dict[str, float]:
    """Embed ``dataset`` (see ``compute_embeddings`` for the keyword arguments) and return the recall@k metrics."""
    image_emb, text_emb = compute_embeddings(model, dataset, tokenize, mode, image_size, **embedding_kwargs)
    index = torch.tensor(dataset.text_image_index(), dtype=torch.long)
    return retrieval_metrics(image_emb, text_emb, index, ks)
