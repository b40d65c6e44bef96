"""Zero-shot caption evaluation on COCO Karpathy test, Flickr30K Karpathy test and NoCaps val.

``datasets`` reads the reference annotation files, ``generate`` captions a test set across ranks, ``metrics`` scores
with pycocoevalcap (BLEU/METEOR/ROUGE-L/CIDEr, no SPICE), ``run`` drives a whole evaluation, ``captioners`` adapts
InternVL-G and InternVL2 chat models to one ``caption(images)`` interface, and ``prepare`` checks the data tree.
"""

from internvl_tune.eval.caption.datasets import (
    BENCHMARKS,
    CaptionImage,
    load_images,
    load_references,
)
from internvl_tune.eval.caption.generate import (
    CaptionModel,
    generate_captions,
    shard_range,
)
from internvl_tune.eval.caption.metrics import METRIC_NAMES, mean_length, score_captions
from internvl_tune.eval.caption.run import (
    CaptionEvalConfig,
    CaptionEvalResult,
    evaluate_captions,
)

__all__ = [
    "BENCHMARKS",
    "METRIC_NAMES",
    "CaptionEvalConfig",
    "CaptionEvalResult",
    "CaptionImage",
    "CaptionModel",
    "evaluate_captions",
    "generate_captions",
    "load_images",
    "load_references",
    "mean_length",
    "score_captions",
    "shard_range",
]
