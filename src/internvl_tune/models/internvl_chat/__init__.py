"""InternVL2 chat models (InternViT + MLP projector + Qwen2 / InternLM2 / Phi-3 / Llama) on transformers' native modules.

Public API: ``load_pretrained`` (original or native layout, strict), ``InternVLChat`` (chat, batch_chat, embed_inputs,
save_pretrained), ``write_tiny_checkpoint`` and ``load_tokenizer``.
"""

from internvl_tune.models.internvl_chat.chat import InternVLChat, load_pretrained
from internvl_tune.models.internvl_chat.tiny import SIZES, write_tiny_checkpoint
from internvl_tune.models.internvl_chat.tokenizers import load_tokenizer

__all__ = ["InternVLChat", "SIZES", "load_pretrained", "load_tokenizer", "write_tiny_checkpoint"]
