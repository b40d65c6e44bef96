"""Every batch kind can be pinned for the DataLoader's pin thread (issue 26: preference batches crashed it on CUDA).

``Tensor.pin_memory`` copies into a buffer with the source's strides, so a batch field that is an overlapping view
(``expand``: several elements at one address) fails there with "more than one element of the written-to tensor
refers to a single memory location". CPU tests never pin, so on the CPU every field of a real batch of each kind
(SFT padded and packed, preference pairs padded and packed, retrieval) is checked for such views; where CUDA is
visible the batches are pinned too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from internvl_tune.data import CheckpointDefaults, DataConfig, SupervisedDataset
from internvl_tune.data.batching import ChatCollator, TensorBatch
from internvl_tune.data.preference import PreferenceCollator, PreferenceDataset

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"
TINY = CheckpointDefaults(template="Hermes-2", image_size=56, downsample_ratio=0.5, num_image_token=4,
                          dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=6)


def overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share one address: a stride of 0 over a dimension longer than 1 (``expand``),
    or whatever else torch's own overlap test (the one that raises in ``copy_``) finds."""
    if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
        return True
    return torch._debug_has_internal_overlap(t) == 1  # 0: no overlap, 1: overlap, 2: too hard to tell


def tensor_fields(batch: TensorBatch) -> dict[str, torch.Tensor]:
    return {name: value for name, value in vars(batch).items() if torch.is_tensor(value)}


def _chat_batches(qwen2, dataset_cls, collator_cls, meta: str) -> dict[str, TensorBatch]:
    ds = dataset_cls(SAMPLE / meta, qwen2, DataConfig().resolve(TINY), is_train=False)
    # one sample of each kind: images, several images, text only (the sample's video needs PyAV: left out)
    picks = [next(i for i, k in enumerate(ds.kinds) if k == kind) for kind in ("image", "multi_image", "text")]
    samples = [ds[i] for i in picks]
    ctx = qwen2.convert_tokens_to_ids("<IMG_CONTEXT>")
    return {f"{'packed' if packed else 'padded'}": collator_cls(packed, 0, ctx, 4)(samples) for packed in (False, True)}


@pytest.fixture(scope="module")
def batches(qwen2, tmp_path_factory) -> dict[str, TensorBatch]:
    """name -> a real batch of each kind, collated from the bundled sample."""
    from internvl_tune.data.retrieval import RetrievalBatch, RetrievalTrainDataset, train_pairs
    from internvl_tune.models.internvl_cg.tokenizer import load_tokenizer
    from internvl_tune.testing.tiny_cg import write_tiny_internvl14b

    out = {f"sft {k}": v for k, v in _chat_batches(qwen2, SupervisedDataset, ChatCollator, "meta.json").items()}
    out.update({f"preference {k}": v for k, v in
                _chat_batches(qwen2, PreferenceDataset, PreferenceCollator, "preference_meta.json").items()})
    ckpt = write_tiny_internvl14b(tmp_path_factory.mktemp("pin_cg"))
    spec = {"root": str(SAMPLE / "flickr30k" / "Images"),
            "annotation": str(SAMPLE / "flickr30k" / "flickr30k_train_karpathy.txt")}
    ds = RetrievalTrainDataset(train_pairs("flickr30k_en_train", spec), load_tokenizer(ckpt, add_eos_token=True),
                               image_size=28, max_seq_length=32)
    out["retrieval"] = RetrievalBatch.collate([ds[i] for i in range(4)])
    return out


def test_the_overlap_check_sees_an_expanded_field():
    """The check below would have caught the bug: the old ``pad_rows`` made ``sample_index`` with ``expand``."""
    assert overlapping(torch.arange(3)[:, None].expand(3, 5))
    assert not overlapping(torch.arange(15).view(3, 5)[:, ::2])  # strided but disjoint: pins fine
    assert not overlapping(torch.zeros(1, 4).expand(1, 4))  # a stride-0 dimension of length 1 holds one element


@pytest.mark.parametrize("kind", ["sft padded", "sft packed", "preference padded", "preference packed", "retrieval"])
def test_no_batch_field_is_an_overlapping_view(batches, kind):
    batch = batches[kind]
    fields = tensor_fields(batch)
    assert len(fields) >= 8  # the test looks at real batches, not at an empty shell
    bad = sorted(name for name, t in fields.items() if overlapping(t))
    assert bad == [], f"{kind} batch fields {bad} are overlapping views: pin_memory would fail on CUDA"


def test_padded_sample_index_values(batches):
    """The rows' sample index is still one value per row after the fix (row i of a padded batch is sample i)."""
    batch = batches["sft padded"]
    rows, length = batch.input_ids.shape
    assert batch.sample_index.tolist() == [[i] * length for i in range(rows)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.parametrize("kind", ["sft padded", "sft packed", "preference padded", "preference packed", "retrieval"])
def test_every_batch_kind_pins(batches, kind):
    batch = batches[kind]
    pinned = batch.pin_memory()
    for name, t in tensor_fields(pinned).items():
        assert t.is_pinned(), name
        assert torch.equal(t, getattr(batch, name)), name
