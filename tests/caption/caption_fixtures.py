"""Shared helpers of the caption tests: a tiny data tree in the reference layout and a fake captioner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# Per image: (colour, reference captions). Captions carry the punctuation, casing and commas the PTB tokenizer handles.
SCENES = [
    ((200, 30, 30), ["A red bus drives down a city street.", "a red double-decker bus on the road",
                     "The bus, painted red, waits at a stop."]),
    ((30, 160, 40), ["A dog runs across the green grass.", "a brown dog playing in a field",
                     "Dog running on a lawn in the park."]),
    ((40, 60, 200), ["A man surfs a large blue wave.", "surfer riding a wave in the ocean",
                     "Someone on a surfboard, in the sea."]),
    ((220, 200, 40), ["Two bananas sit on a wooden table.", "a bunch of yellow bananas",
                      "Ripe bananas on a kitchen counter."]),
    ((120, 120, 120), ["A grey cat sleeps on a sofa.", "a cat curled up on the couch",
                       "The kitten's asleep on a cushion."]),
]
WORDS = ["red", "green", "blue", "yellow", "grey"]


def write_image(path: Path, colour, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.integers(-20, 20, (24, 32, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def build_tree(root: Path) -> Path:
    """coco / flickr30k / nocaps in the layout the InternVL docs prescribe, 5 images each."""
    coco_list, gt_images, gt_anns = [], [], []
    flickr = {"images": [], "annotations": []}
    nocaps = {"images": [], "annotations": []}
    for k, (colour, refs) in enumerate(SCENES):
        coco_id = 391895 + 17 * k
        name = f"val2014/COCO_val2014_{coco_id:012d}.jpg"
        write_image(root / "coco" / name, colour, k)
        coco_list.append({"image": name, "caption": refs})
        gt_images.append({"id": coco_id})
        gt_anns += [{"image_id": coco_id, "id": len(gt_anns) + j, "caption": c} for j, c in enumerate(refs)]
        flickr_id = 1000092795 + k
        write_image(root / "flickr30k" / "Images" / f"{flickr_id}.jpg", colour, 10 + k)
        flickr["images"].append({"id": flickr_id, "file_name": f"Images/{flickr_id}.jpg"})
        flickr["annotations"] += [{"image_id": flickr_id, "id": len(flickr["annotations"]), "caption": c} for c in refs]
        write_image(root / "nocaps" / "images" / f"{k:04x}ea2087020901.jpg", colour, 20 + k)
        nocaps["images"].append({"id": k, "file_name": f"{k:04x}ea2087020901.jpg", "open_images_id": f"{k:04x}"})
        nocaps["annotations"] += [{"image_id": k, "id": 100 + len(nocaps["annotations"]), "caption": c} for c in refs]
    ann = root / "coco" / "annotations"
    ann.mkdir(parents=True)
    (ann / "coco_karpathy_test.json").write_text(json.dumps(coco_list))
    (ann / "coco_karpathy_test_gt.json").write_text(json.dumps({"images": gt_images, "annotations": gt_anns}))
    (root / "flickr30k" / "flickr30k_test_karpathy.json").write_text(json.dumps(flickr))
    (root / "nocaps" / "nocaps_val_4500_captions.json").write_text(json.dumps(nocaps))
    return root


class ColourCaptioner:
    """Captions an image by its dominant colour, so a wrong image order or sharding shows in the text."""

    def __init__(self):
        self.batch_sizes = []

    def caption(self, images):
        self.batch_sizes.append(len(images))
        out = []
        for img in images:
            mean = np.asarray(img, dtype=np.float64).mean(axis=(0, 1))
            k = int(np.argmin([np.abs(mean - c).sum() for c, _ in SCENES]))
            out.append(f"a {WORDS[k]} picture of {SCENES[k][1][0].split()[1].lower()} things")
        return out
