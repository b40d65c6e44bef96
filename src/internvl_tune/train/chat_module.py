"""The InternVL2 training forward as one module, so FSDP2 can wrap it as the root.

vision tower -> pixel shuffle -> mlp1 -> image embeddings scattered into the token embeddings -> LLM decoder ->
weighted next-token loss on supervised positions only (``train/loss.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from internvl_tune.models import varlen_attention
from internvl_tune.train.loss import weighted_lm_loss_sum


class ChatTrainModule(nn.Module):
    """Wraps an ``InternVLChat`` for training; ``forward(batch)`` returns the weighted loss sum."""

    def __init__(self, chat):
        super().__init__()
        self.model = chat.model  # the only registered child: FSDP2 and checkpoints see the usual parameter names
        self._chat = chat
        # packed rows run one causal attention per sample (flash varlen on CUDA); padded batches keep SDPA
        self.model.model.language_model.config._attn_implementation = varlen_attention.register()

    def forward(self, batch: dict) -> torch.Tensor:
        """Weighted sum of token losses of one micro-batch (divide by the global weight sum outside).

        Args:
            batch: a micro-batch from ``train.chat_batch.ChatCollator`` on the model's device (``input_ids``,
                ``position_ids``, ``attention_mask`` or packed-row bounds, ``pixel_values``, the image layout and
                the loss positions, targets and weights).
        """
        embeds = self._chat.embed_inputs(batch["input_ids"], batch["pixel_values"], layout=batch)
        packed = {}
        if "cu_seq_lens" in batch:  # a packed row: one causal attention per sample
            cu, longest = batch["cu_seq_lens"], batch["max_length"]
            packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        out = self.model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
            use_cache=False,
            **packed,
        )
        return weighted_lm_loss_sum(out.last_hidden_state, self.model.lm_head.weight, batch["loss_index"],
                                    batch["loss_target"], batch["loss_weight"])
