"""InternVL chat models (InternViT + MLP projector + an LLM of families.py) on transformers' native modules.

Public API: ``load_pretrained`` (original or native layout, strict), ``InternVLChat`` (chat, batch_chat, embed_inputs,
save_pretrained) and ``load_tokenizer``; ``recipe`` holds what fine-tuning needs (trainable flags, the training
forward, export).
"""

from internvl_tune.models.internvl_chat.chat import InternVLChat, load_pretrained
from internvl_tune.models.internvl_chat.tokenizers import load_tokenizer

__all__ = ["InternVLChat", "load_pretrained", "load_tokenizer"]
