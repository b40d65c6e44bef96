"""Sharded, batched caption generation: contiguous shards, batch sizes and 2 gloo ranks all give the same result."""

from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from caption_fixtures import ColourCaptioner, build_tree

from internvl_tune.errors import DataError
from internvl_tune.eval.caption.datasets import BENCHMARKS, CaptionImage, load_images
from internvl_tune.eval.caption.generate import generate_captions, shard_range


@pytest.mark.parametrize(("total", "world", "expected"), [
    (10, 3, [range(0, 4), range(4, 7), range(7, 10)]),  # the first total % world ranks take one more
    (5, 2, [range(0, 3), range(3, 5)]),
    (2, 4, [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]),
    (8, 1, [range(0, 8)]),
])
def test_shards_are_contiguous_and_cover_everything(total, world, expected):
    assert [shard_range(total, r, world) for r in range(world)] == expected


def test_batch_size_does_not_change_captions_or_order(data_root):
    images = load_images(BENCHMARKS["flickr30k"], data_root)
    one = ColourCaptioner()
    reference = generate_captions(one, images, batch_size=1, show_progress=False)
    assert one.batch_sizes == [1] * 5
    assert [i for i, _ in reference] == [x.image_id for x in images]
    assert reference[2][1] == "a blue picture of man things"
    three = ColourCaptioner()
    assert generate_captions(three, images, batch_size=3, num_workers=3, show_progress=False) == reference
    assert three.batch_sizes == [3, 2]


def test_unreadable_image_is_a_data_error(tmp_path, captioner):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    images = [CaptionImage(1, tmp_path / "bad.jpg")]
    with pytest.raises(DataError, match="bad.jpg: cannot read image"):
        generate_captions(captioner, images, show_progress=False)
    with pytest.raises(DataError, match="absent.jpg: image not found"):
        generate_captions(captioner, [CaptionImage(2, tmp_path / "absent.jpg")], show_progress=False)


def _rank_worker(rank, world, port, root, batch_size, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def gather(items):
        boxes = [None] * world
        dist.all_gather_object(boxes, items)
        return [x for box in boxes for x in box]

    images = load_images(BENCHMARKS["coco"], root)
    result = generate_captions(ColourCaptioner(), images, batch_size=batch_size, rank=rank, world_size=world,
                               gather=gather, show_progress=False)
    queue.put((rank, result))
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_rank(tmp_path):
    root = build_tree(tmp_path / "data")  # 5 images: ranks get 3 and 2
    single = generate_captions(ColourCaptioner(), load_images(BENCHMARKS["coco"], root), show_progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_rank_worker, args=(2, port, root, 2, queue), nprocs=2, start_method="spawn")
    results = dict(queue.get(timeout=60) for _ in range(2))
    assert results[0] == single and results[1] == single
