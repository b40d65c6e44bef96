"""Configuration of InternVL-14B (InternViT-6B + QLLaMA), read from and written to the reference ``config.json``.

The on-disk file has three levels, with the keys of the reference's ``InternVLConfig``::

    {"model_type": "internvl", "clip_embed_dim": 768, "attn_pool_num_heads": 16, "num_query_token": 96,
     "cross_attention_frequency": 2, "label_smoothing": 0.0, "use_backbone_lora": 0, "use_qllama_lora": 0,
     "force_image_size": null, "initializer_range": 0.02,
     "vision_config": {"model_type": "intern_vit_6b", "hidden_size": 3200, "num_hidden_layers": 48, ...},
     "qllama_config": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, ...}}

Unknown keys (``architectures``, ``auto_map``, ``max_txt_len``, the dozens of generic ``PretrainedConfig`` fields the
reference serialises) are kept verbatim in ``raw`` so that saving reproduces the file a user started from.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import LlamaConfig

from internvl_tune.errors import CheckpointError


@dataclass
class VisionConfig:
    """InternViT-6B hyper-parameters (reference ``InternVisionConfig``; defaults are the 6B model's)."""

    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    qkv_bias: bool = False
    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    num_hidden_layers: int = 48
    use_flash_attn: bool = True
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"  # "rms_norm" (InternViT-6B) or "layer_norm" (later InternViTs)
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 0.1

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Keys of the top-level config and their defaults (the reference's ``InternVLConfig.__init__``).
TOP_LEVEL_DEFAULTS = dict(
    clip_embed_dim=768,
    attn_pool_num_heads=16,
    num_query_token=96,
    label_smoothing=0.0,
    cross_attention_frequency=2,
    use_backbone_lora=0,
    use_qllama_lora=0,
    force_image_size=None,
    initializer_range=0.02,
)


@dataclass
class InternVLCGConfig:
    """The whole model: vision tower, QLLaMA and the heads between them.

    ``qllama_config`` is a transformers ``LlamaConfig`` (so HF generation and its caches work on it) carrying three
    extra attributes the QLLaMA layers read: ``num_query_token``, ``cross_attention_frequency`` and
    ``vision_hidden_size`` (the width of the image features the cross-attention keys/values are projected from).
    """

    vision_config: VisionConfig
    qllama_config: LlamaConfig
    clip_embed_dim: int = 768
    attn_pool_num_heads: int = 16
    num_query_token: int = 96
    label_smoothing: float = 0.0
    cross_attention_frequency: int = 2
    use_backbone_lora: int = 0
    use_qllama_lora: int = 0
    force_image_size: int | None = None
    initializer_range: float = 0.02
    # Not an InternVLConfig argument but a PretrainedConfig default (True) the reference's `tie_weights` obeys: it
    # ties qllama.lm_head to qllama.model.embed_tokens. Released configs do not write it, so it is on.
    tie_word_embeddings: bool = True
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def image_size(self) -> int:
        """The input resolution the model runs at: ``force_image_size`` when set, else the vision image size."""
        return self.force_image_size or self.vision_config.image_size

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "InternVLCGConfig":
        """Build from the reference ``config.json`` dict; missing keys take the reference defaults."""
        if not isinstance(d.get("vision_config", {}), dict) or not isinstance(d.get("qllama_config", {}), dict):
            raise CheckpointError(f"{where}: `vision_config` and `qllama_config` must be JSON objects")
        top = {k: d.get(k, v) for k, v in TOP_LEVEL_DEFAULTS.items()}
        vision = VisionConfig.from_dict(d.get("vision_config", {}))
        qllama = _llama_config(d.get("qllama_config", {}), top, vision.hidden_size)
        tie = bool(d.get("tie_word_embeddings", True))
        return cls(vision_config=vision, qllama_config=qllama, tie_word_embeddings=tie, raw=copy.deepcopy(d), **top)

    @classmethod
    def from_file(cls, path: str | Path) -> "InternVLCGConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read the model config ({exc})") from exc
        if d.get("model_type", "internvl") != "internvl" or "qllama_config" not in d:
            raise CheckpointError(
                f"{path}: not an InternVL-14B (InternVL-C/G) config — expected model_type 'internvl' with a "
                "`qllama_config`; InternVL2 chat checkpoints are loaded by the chat commands instead"
            )
        return cls.from_dict(d, where=str(path))

    def to_dict(self) -> dict:
        """The reference layout, starting from the file we were read from so unknown keys survive."""
        out = copy.deepcopy(self.raw)
        for k in TOP_LEVEL_DEFAULTS:
            out[k] = getattr(self, k)
        if "tie_word_embeddings" in out or not self.tie_word_embeddings:
            out["tie_word_embeddings"] = self.tie_word_embeddings
        out["hidden_size"] = self.qllama_config.hidden_size
        out["model_type"] = "internvl"
        out["vision_config"] = {**out.get("vision_config", {}), **dataclasses.asdict(self.vision_config)}
        out["vision_config"].setdefault("model_type", "intern_vit_6b")
        qllama = out.get("qllama_config", {})
        for k in _LLAMA_KEYS:
            qllama[k] = getattr(self.qllama_config, k)
        qllama["num_query_token"] = self.num_query_token
        qllama["cross_attention_frequency"] = self.cross_attention_frequency
        qllama.setdefault("model_type", "llama")
        out["qllama_config"] = qllama
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# The LLaMA fields QLLaMA reads; everything else in ``qllama_config`` is generic PretrainedConfig noise.
_LLAMA_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
_LLAMA_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _llama_config(d: dict, top: dict, vision_hidden_size: int) -> LlamaConfig:
    kwargs = {k: d.get(k, v) for k, v in _LLAMA_DEFAULTS.items()}
    if kwargs["hidden_size"] % kwargs["num_attention_heads"]:
        raise CheckpointError(
            f"qllama_config: hidden_size {kwargs['hidden_size']} is not divisible by num_attention_heads "
            f"{kwargs['num_attention_heads']}"
        )
    cfg = LlamaConfig(**kwargs, tie_word_embeddings=False, use_cache=True)
    # The reference overwrites these two from the top level, whatever qllama_config says.
    cfg.num_query_token = top["num_query_token"]
    cfg.cross_attention_frequency = top["cross_attention_frequency"]
    cfg.vision_hidden_size = vision_hidden_size
    return cfg
