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

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from internvl_tune.data.images import load_image
from internvl_tune.data.retrieval import RetrievalEvalSet, eval_transform
from internvl_tune.eval.sharding import shard_range


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
