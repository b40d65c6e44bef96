"""The InternVL-C/G retrieval fine-tuning loss: ITM + ITC (query side and backbone side), as the reference.

Inputs come from ``InternVLModel.retrieval_features`` on this rank's micro-batch of B (image, caption) pairs:

* ITM: ``itm_logits`` ``[2B, 2]`` for [B negative captions; B positive captions] of the same images; cross-entropy
  with labels 0 (no match) and 1 (match).
* ITC: the L2-normalised image (queries -> clip_projector2), text (``summarize:`` EOS -> text_projection) and
  backbone (ViT -> clip_projector) embeddings are gathered over all ranks; each local row is contrasted against all
  gathered rows. Targets are soft: every gathered caption of the same ``image_id`` is a positive, with weight
  1 / (number of such captions). ``loss_itc = (t2i + i2t) / 2 + (backbone_t2i + backbone_i2t) / 2``.

Every term is a mean over this rank's rows. So the mean of the N ranks' losses equals the loss of one process on the
whole batch, and with a gather whose backward sums gradients over ranks (``internvl_tune.dist.gather_with_grad``)
followed by the usual gradient averaging, so are the gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def soft_contrastive(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the cross-entropy between ``softmax(logits)`` and target distributions."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def retrieval_loss(
    itm_logits: torch.Tensor,
    image_itc: torch.Tensor,
    text_itc: torch.Tensor,
    backbone: torch.Tensor,
    logit_scale: torch.Tensor,
    image_ids: torch.Tensor,
    gather_fn: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> dict[str, torch.Tensor]:
    """ITM + ITC loss of one rank's micro-batch.

    Args:
        itm_logits: ``[2B, 2]``, negatives first.
        image_itc / text_itc / backbone: ``[B, D]`` unnormalised embeddings.
        logit_scale: the already exponentiated temperature inverse (scalar).
        image_ids: ``[B]`` (or ``[B, 1]``) ids; captions with equal ids are positives of each other's images.
        gather_fn: concatenates a ``[B, ...]`` tensor over ranks in rank order, with gradient (identity on one
            process); ``internvl_tune.dist.gather_with_grad`` in distributed training.

    Returns:
        ``loss`` (to backpropagate), and detached ``loss_itm``, ``loss_itc``, ``pos_match_acc``, ``neg_match_acc``,
        ``vision_similarity`` (mean cosine between backbone and query image embeddings) for logging.
    """
    B = image_itc.shape[0]
    labels = torch.cat([torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long)]).to(itm_logits.device)
    loss_itm = F.cross_entropy(itm_logits.float(), labels)
    pred = itm_logits.argmax(dim=-1)
    neg_acc = (pred[:B] == 0).float().mean()
    pos_acc = (pred[B:] == 1).float().mean()

    image_itc, text_itc, backbone = (F.normalize(t.float(), dim=-1) for t in (image_itc, text_itc, backbone))
    image_all, text_all, backbone_all = gather_fn(image_itc), gather_fn(text_itc), gather_fn(backbone)
    ids = image_ids.reshape(-1, 1)
    ids_all = gather_fn(ids)
    positives = (ids == ids_all.reshape(1, -1)).float()  # [B, world * B]
    targets = positives / positives.sum(dim=1, keepdim=True)

    scale = logit_scale.float()
    loss_t2i = soft_contrastive(scale * text_itc @ image_all.t(), targets)
    loss_i2t = soft_contrastive(scale * image_itc @ text_all.t(), targets)
    loss_bb_t2i = soft_contrastive(scale * text_itc @ backbone_all.t(), targets)
    loss_bb_i2t = soft_contrastive(scale * backbone @ text_all.t(), targets)
    loss_itc = (loss_t2i + loss_i2t) / 2 + (loss_bb_t2i + loss_bb_i2t) / 2

    vision_sim = F.cosine_similarity(backbone.detach(), image_itc.detach()).mean()
    return dict(
        loss=loss_itm + loss_itc,
        loss_itm=loss_itm.detach(),
        loss_itc=loss_itc.detach(),
        pos_match_acc=pos_acc,
        neg_match_acc=neg_acc,
        vision_similarity=vision_sim,
    )
