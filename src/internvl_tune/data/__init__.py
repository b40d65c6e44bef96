"""The InternVL2 data pipeline: meta JSON + JSONL -> tiled images, templated and masked token ids -> batches.

Stages (each its own module): ``meta`` (datasets, lazy JSONL index), ``images`` / ``video`` (pixels), ``templates`` +
``preprocess`` (prompt, image tokens, labels), ``dataset`` (the four sample kinds), ``collate`` / ``packing``
(batches), ``check`` (validation behind ``internvl-tune data check``).
"""

from internvl_tune.data.collate import pad_collate
from internvl_tune.data.dataset import KINDS, DataConfig, SupervisedDataset, sample_kind
from internvl_tune.data.images import build_transform, choose_grid, dynamic_preprocess, load_image, num_tiles
from internvl_tune.data.meta import DatasetSpec, JsonlIndex, read_meta
from internvl_tune.data.preprocess import Encoded, build_conversation_ids, parse_conversations
from internvl_tune.data.templates import TEMPLATES, Template, get_template
from internvl_tune.data.video import frame_indices, load_video_frames

__all__ = [
    "KINDS",
    "TEMPLATES",
    "DataConfig",
    "DatasetSpec",
    "Encoded",
    "JsonlIndex",
    "SupervisedDataset",
    "Template",
    "build_conversation_ids",
    "build_transform",
    "choose_grid",
    "dynamic_preprocess",
    "frame_indices",
    "get_template",
    "load_image",
    "load_video_frames",
    "num_tiles",
    "pad_collate",
    "parse_conversations",
    "read_meta",
    "sample_kind",
]
