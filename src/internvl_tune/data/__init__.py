"""The InternVL2 data pipeline: meta JSON + JSONL -> tiled images, templated and masked token ids -> batches.

Stages (each its own module): ``config`` (the one data configuration), ``meta`` (datasets, lazy JSONL index, sample
kinds), ``images`` / ``video`` (pixels), ``templates`` + ``preprocess`` (prompt, image tokens, labels), ``dataset``
(the four sample kinds), ``batching`` (samplers, packing, the typed ``ChatBatch``), ``check`` (validation behind
``internvl-tune data check``), ``retrieval`` (InternVL-C/G image-text pairs).
"""

from internvl_tune.data.batching import ChatBatch, ChatCollator
from internvl_tune.data.config import RELEASE_DEFAULTS, CheckpointDefaults, DataConfig
from internvl_tune.data.dataset import SupervisedDataset
from internvl_tune.data.images import build_transform, choose_grid, dynamic_preprocess, load_image, num_tiles
from internvl_tune.data.meta import KINDS, DatasetSpec, JsonlIndex, read_meta, sample_kind
from internvl_tune.data.preprocess import Encoded, build_conversation_ids, parse_conversations
from internvl_tune.data.templates import TEMPLATES, Template, get_template
from internvl_tune.data.video import frame_indices, load_video_frames

__all__ = [
    "KINDS",
    "RELEASE_DEFAULTS",
    "TEMPLATES",
    "ChatBatch",
    "ChatCollator",
    "CheckpointDefaults",
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
    "parse_conversations",
    "read_meta",
    "sample_kind",
]
