"""InternVL-14B as InternVL-C (contrastive) and InternVL-G (generative), with the reference checkpoint's keys.

Parameters (their names are the state-dict keys of ``pretrained/InternVL-14B-224px``)::

    vision_model.*       InternViT-6B
    qllama.*             QLLaMA (``qllama.model.*`` decoder, ``qllama.lm_head``)
    query_tokens         [1, num_query_token, H_text]  learnable queries prepended to QLLaMA's input
    text_projection      [H_text, clip_embed_dim]      text embedding = EOS hidden state @ text_projection
    logit_scale          []                            log of the contrastive temperature's inverse
    clip_projector       attention pooling over ViT tokens   -> clip_embed_dim   (InternVL-C image embedding)
    clip_projector2      attention pooling over query outputs -> clip_embed_dim  (InternVL-G's second half)
    itm_head             Linear(H_text, 2)             image-text matching on the query outputs

Modes: ``encode_image(x, "InternVL-C")`` = clip_projector(ViT); ``"InternVL-G"`` = the sum of the L2-normalised
clip_projector(ViT) and clip_projector2(queries cross-attending to the ViT). ``encode_text`` is shared. ``"C"`` and
``"G"`` are accepted too. ``model(image, text, mode)`` returns ``(logits_per_image, logits_per_text)`` as the
reference's ``InternVL_C`` / ``InternVL_G`` forward does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from internvl_tune.errors import UserError
from internvl_tune.models.internvl_cg.config import InternVLCGConfig
from internvl_tune.models.internvl_cg.intern_vit import InternVisionModel
from internvl_tune.models.internvl_cg.qllama import QLlamaForCausalLM, causal_padding_mask

MODES = ("InternVL-C", "InternVL-G")


def resolve_mode(mode: str) -> str:
    """``"C"`` / ``"G"`` or ``"InternVL-C"`` / ``"InternVL-G"`` (any case) -> the full name."""
    key = str(mode).strip().upper()
    key = key[len("INTERNVL-"):] if key.startswith("INTERNVL-") else key
    if key not in ("C", "G"):
        raise UserError(f"mode {mode!r}: use 'InternVL-C' (or 'C': contrastive, the ViT's pooled features) or "
                        "'InternVL-G' (or 'G': with QLLaMA's queries)")
    return f"InternVL-{key}"


class PoolingCrossAttention(nn.Module):
    """Multi-head attention of one query over a sequence; q/k/v weights without bias plus separate bias vectors."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention pooling: dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, Nq, C = x.shape
        heads = lambda t, b, w: F.linear(t, w, b).view(B, t.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q = heads(x, self.q_bias, self.q.weight)
        k = heads(k, self.k_bias, self.k.weight)
        v = heads(v, self.v_bias, self.v.weight)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, Nq, C))


class AttentionPoolingBlock(nn.Module):
    """Pool ``[B, N, dim]`` to ``[B, out_dim]``: the token mean queries LayerNorm'd keys/values (no FFN)."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_k = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_v = nn.LayerNorm(dim, eps=1e-5)
        self.cross_attn = PoolingCrossAttention(dim, num_heads, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.norm1_q(x.mean(1, keepdim=True))
        return self.cross_attn(q, self.norm1_k(x), self.norm1_v(x)).squeeze(1)


class InternVLModel(nn.Module):
    """InternViT-6B + QLLaMA + heads. See the module docstring for the parameters."""

    def __init__(self, config: InternVLCGConfig):
        super().__init__()
        self.config = config
        text_dim, vision_dim = config.qllama_config.hidden_size, config.vision_config.hidden_size
        self.num_query_token = config.num_query_token
        self.vision_model = InternVisionModel(config.vision_config, image_size=config.image_size)
        self.qllama = QLlamaForCausalLM(config.qllama_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_token, text_dim))
        self.text_projection = nn.Parameter(torch.empty(text_dim, config.clip_embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.clip_projector = AttentionPoolingBlock(vision_dim, config.attn_pool_num_heads, config.clip_embed_dim)
        self.clip_projector2 = AttentionPoolingBlock(text_dim, config.attn_pool_num_heads, config.clip_embed_dim)
        self.itm_head = nn.Linear(text_dim, 2)
        if config.tie_word_embeddings:
            # The reference model inherits `PreTrainedModel.tie_weights` with the default tie_word_embeddings=True,
            # which makes qllama.lm_head share the input embedding matrix. Keep that sharing.
            self.qllama.lm_head.weight = self.qllama.model.embed_tokens.weight

    # ------------------------------------------------------------------ building blocks
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.qllama.model.embed_tokens(input_ids)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT last hidden state ``[B, 1 + N, C_vision]`` (pixel values cast to the model dtype)."""
        return self.vision_model(pixel_values.to(self.vision_model.embeddings.patch_embedding.weight.dtype))

    def query_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The queries alone through QLLaMA, attending to each other both ways and to the image: ``[B, Q, H]``."""
        B = image_embeds.shape[0]
        queries = self.query_tokens.expand(B, -1, -1).to(image_embeds.dtype)
        mask = torch.zeros(B, 1, self.num_query_token, self.num_query_token, dtype=queries.dtype, device=queries.device)
        return self.qllama.model(queries, mask, vision_hidden_states=image_embeds)

    def text_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Causal QLLaMA over text alone (no queries, no image): last hidden states ``[B, L, H]``."""
        embeds = self.embed_tokens(input_ids)
        mask = causal_padding_mask(attention_mask, input_ids.shape[1], embeds.dtype)
        return self.qllama.model(embeds, mask)

    # ------------------------------------------------------------------ retrieval encoders
    def encode_image(self, pixel_values: torch.Tensor, mode: str = "InternVL-C") -> torch.Tensor:
        """Image embeddings ``[B, clip_embed_dim]`` (not normalised; G's is a sum of two unit vectors)."""
        mode = resolve_mode(mode)
        image_embeds = self.vision_features(pixel_values)
        backbone = self.clip_projector(image_embeds)
        if mode == "InternVL-C":
            return backbone
        queries = self.clip_projector2(self.query_features(image_embeds))
        return F.normalize(backbone, dim=-1) + F.normalize(queries, dim=-1)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings ``[B, clip_embed_dim]``: the hidden state at the last non-pad token @ text_projection.

        Padding is id 0 (``attention_mask = ids > 0``), as the reference's clip_benchmark tokenizer pads.
        """
        mask = input_ids > 0
        hidden = self.text_hidden(input_ids, mask.long())
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1]
        return last @ self.text_projection.to(last.dtype)

    def forward(self, image: torch.Tensor, text: torch.Tensor, mode: str = "InternVL-C"
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Contrastive logits, as the reference's ``InternVL_C`` / ``InternVL_G`` ``forward(image, text)``.

        Args:
            image: pixel values ``[B_img, 3, S, S]``.
            text: token ids ``[B_txt, L]``, padded with 0 (the clip_benchmark tokenizer's padding).
            mode: ``"InternVL-C"`` / ``"C"`` or ``"InternVL-G"`` / ``"G"``.

        Returns:
            ``(logits_per_image [B_img, B_txt], logits_per_text [B_txt, B_img])``: ``logit_scale.exp()`` times the
            cosine similarities of the two embeddings.
        """
        image_features = F.normalize(self.encode_image(image, mode), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    # ------------------------------------------------------------------ retrieval training pieces
    def retrieval_attention_mask(self, text_mask: torch.Tensor, repeat_time: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``[r*B, 1, Q+L, Q+L]`` masks for the stacked ``[ITM rows ...; ITC rows]`` batch.

        ITM rows (all but the last block): full bidirectional attention over queries + text, padding masked.
        ITC rows (the last block): queries see only queries, text sees only text, causally.
        """
        Q = self.num_query_token
        full = torch.cat([torch.ones_like(text_mask[:, :1]).expand(-1, Q), text_mask], dim=1)
        neg = torch.finfo(dtype).min
        mask = torch.zeros(full.shape[0], 1, full.shape[1], full.shape[1], dtype=dtype, device=full.device)
        mask = mask.masked_fill((full == 0)[:, None, None, :], neg)
        itc = mask.chunk(repeat_time, dim=0)[-1]
        itc[:, :, :Q, Q:] = neg
        itc[:, :, Q:, :Q] = neg
        L = text_mask.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=full.device).triu(1)
        itc[:, :, Q:, Q:] = (itc[:, :, Q:, Q:] + causal.to(dtype) * neg).clamp_min(neg)
        return mask

    def retrieval_features(
        self,
        pixel_values: torch.Tensor,
        negative_input_ids: torch.Tensor,
        negative_attention_mask: torch.Tensor,
        positive_input_ids: torch.Tensor,
        positive_attention_mask: torch.Tensor,
        summarize_input_ids: torch.Tensor,
        summarize_attention_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The forward of retrieval fine-tuning up to the loss (see ``loss.retrieval_loss``).

        Returns:
            ``itm_logits`` ``[2B, 2]`` (negatives first, then positives), and the unnormalised ``image_itc``
            (clip_projector2 of the ITC queries), ``text_itc`` (summarize-caption EOS @ text_projection) and
            ``backbone`` (clip_projector of the ViT), each ``[B, clip_embed_dim]``, plus ``logit_scale`` (exp'd).
        """
        image_embeds = self.vision_features(pixel_values)
        backbone = self.clip_projector(image_embeds)
        B, Q = pixel_values.shape[0], self.num_query_token
        input_ids = torch.cat([negative_input_ids, positive_input_ids, summarize_input_ids])
        text_mask = torch.cat([negative_attention_mask, positive_attention_mask, summarize_attention_mask])
        embeds = self.embed_tokens(input_ids)
        queries = self.query_tokens.expand(3 * B, -1, -1).to(embeds.dtype)
        embeds = torch.cat([queries, embeds], dim=1)
        mask = self.retrieval_attention_mask(text_mask, 3, embeds.dtype)
        hidden = self.qllama.model(embeds, mask, vision_hidden_states=image_embeds, repeat_time=3)
        image_part, text_part = hidden[:, :Q], hidden[:, Q:]
        itm_logits = self.itm_head(image_part[: 2 * B]).mean(dim=1)
        image_itc = self.clip_projector2(image_part[2 * B :])
        text_itc = text_part[2 * B :]
        last = summarize_attention_mask.sum(1) - 1
        text_itc = text_itc[torch.arange(B, device=text_itc.device), last] @ self.text_projection.to(text_itc.dtype)
        return dict(itm_logits=itm_logits, image_itc=image_itc, text_itc=text_itc, backbone=backbone,
                    logit_scale=self.logit_scale.exp())

    # ------------------------------------------------------------------ captioning (InternVL-G)
    @torch.no_grad()
    def generate(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generation_kwargs
    ) -> torch.LongTensor:
        """Caption tokens: the queries read the image, then QLLaMA continues the prompt (``English caption:``).

        Args:
            pixel_values: ``[B, 3, S, S]``.
            input_ids / attention_mask: the tokenized prompt ``[B, L]``, left-padded when batched.
            **generation_kwargs: passed to transformers' ``generate`` (``num_beams``, ``max_new_tokens``,
                ``min_new_tokens``, ``do_sample`` ...).

        Returns:
            ``[B, T]`` new token ids only (the prompt is given as embeddings, so it is not echoed).
        """
        image_embeds = self.vision_features(pixel_values)
        embeds = self.embed_tokens(input_ids)
        B = embeds.shape[0]
        queries = self.query_tokens.expand(B, -1, -1).to(embeds.dtype)
        embeds = torch.cat([queries, embeds], dim=1)
        mask = torch.cat([torch.ones(B, self.num_query_token, dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        return self.qllama.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            vision_hidden_states=image_embeds,
            use_zero_attention_mask=True,
            **generation_kwargs,
        )
