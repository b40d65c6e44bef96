"""Images: loading, dynamic-resolution tiling and the tensor transform (PIL + torch, no torchvision).

InternVL2 cuts an image into a grid of ``image_size`` tiles whose aspect ratio is closest to the image's, plus an
optional thumbnail of the whole image. Every rule here follows the reference implementation, including its tie rule.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from internvl_tune.constants import IMAGENET_MEAN, IMAGENET_STD, NORMALIZE
from internvl_tune.errors import DataError, MediaError

BICUBIC = Image.Resampling.BICUBIC
JPEG_QUALITIES = range(75, 101)  # the reference draws the re-encode quality uniformly from 75..100


@lru_cache(maxsize=64)
def candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """All (columns, rows) grids with ``min_num <= columns * rows <= max_num``, fewest tiles first.

    Among grids with the same tile count the order decides exact ties (see :func:`choose_grid`). The reference keeps
    the order in which a Python ``set`` built by looping n = min..max, columns = 1..n, rows = 1..n yields them (its
    sort by tile count is stable); set order depends on that insertion sequence, so we insert in the same sequence.
    """
    grids: set[tuple[int, int]] = set()
    for n in range(min_num, max_num + 1):
        for cols in range(1, n + 1):
            for rows in range(1, n + 1):
                if min_num <= cols * rows <= max_num:
                    grids.add((cols, rows))
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448) -> tuple[int, int]:
    """The (columns, rows) grid for a ``width`` x ``height`` image.

    The grid whose aspect ratio is closest to the image's wins. On an exact tie a later candidate (more tiles) replaces
    the current best only when the image has more than half the pixels of that grid at full resolution, so small
    images are not blown up into many tiles.
    """
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, min_num: int, max_num: int, use_thumbnail: bool, image_size: int = 448) -> int:
    """How many tiles :func:`dynamic_preprocess` returns for an image of this size (no pixels needed)."""
    cols, rows = choose_grid(width, height, min_num, max_num, image_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = False
) -> list[Image.Image]:
    """Cut ``image`` into ``columns x rows`` tiles of ``image_size`` pixels (row-major), plus a thumbnail.

    Args:
        image: the input picture.
        min_num: fewest tiles allowed.
        max_num: most tiles allowed (the thumbnail is extra).
        image_size: side of a square tile.
        use_thumbnail: append the whole image resized to one tile when the grid has more than one tile.

    Returns:
        The tiles, then the thumbnail if any.
    """
    cols, rows = choose_grid(*image.size, min_num, max_num, image_size)
    resized = image.resize((cols * image_size, rows * image_size), BICUBIC)
    tiles = []
    for r in range(rows):
        for c in range(cols):
            box = (c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)
            tiles.append(resized.crop(box))
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), BICUBIC))
    return tiles


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side symmetrically (top/left get the floor of half the padding) to make a square."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def jpeg_reencode(image: Image.Image, quality: int) -> Image.Image:
    """Save as JPEG at ``quality`` and decode again: the reference's training-time augmentation."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


class ImageTransform:
    """PIL tile -> normalised ``[3, S, S]`` float tensor, as the reference's ``build_transform``.

    Steps: RGB; (augment) JPEG re-encode at a quality drawn from 75..100; (no augment, ``pad2square``) pad to a square
    with the mean colour; bicubic resize to ``S x S``; scale to [0, 1]; normalise with the chosen mean/std.
    """

    def __init__(self, augment: bool, input_size: int, pad2square: bool = False, normalize_type: str = "imagenet"):
        if normalize_type not in NORMALIZE:
            raise DataError(f"unknown normalize_type {normalize_type!r}", fix=f"use one of {', '.join(NORMALIZE)}")
        self.mean, self.std = NORMALIZE[normalize_type]
        self.augment, self.input_size, self.pad2square = augment, input_size, pad2square
        self.fill = tuple(int(m * 255) for m in self.mean)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.augment:
            if rng is None:
                raise ValueError("an augmenting transform needs an rng (for reproducible JPEG qualities)")
            image = jpeg_reencode(image, int(rng.choice(JPEG_QUALITIES)))
        elif self.pad2square:
            image = expand2square(image, self.fill)
        return resize_normalize(image, self.input_size, self.mean, self.std)


def normalize(image: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """RGB PIL image -> ``[3, H, W]`` float tensor: divide by 255, subtract ``mean``, divide by ``std``.

    The same float32 operations as torchvision's ToTensor + Normalize, in numpy on the HWC array, which is several
    times faster than torch on small tensors in data-loader workers.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    pixels -= np.asarray(mean, dtype=np.float32)
    pixels /= np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def resize_normalize(image: Image.Image, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Bicubic resize to ``size x size`` (no crop), then :func:`normalize`: the reference's evaluation transform."""
    return normalize(image.convert("RGB").resize((size, size), BICUBIC), mean, std)


def build_transform(is_train: bool, input_size: int, pad2square: bool = False, normalize_type: str = "imagenet"):
    """The reference's transform: JPEG augmentation when ``is_train``, else optional pad-to-square (see ImageTransform)."""
    return ImageTransform(is_train, input_size, pad2square, normalize_type)


def load_image(path: str, where: str | None = None) -> Image.Image:
    """Open ``path`` and decode it to RGB; a missing, unreadable or oversized file raises MediaError naming ``where``.

    Images above PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``, 89M pixels) are refused before decoding: PIL only
    warns between one and two times the limit, and decoding such a file (or a decompression bomb) stalls a worker.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"image {path} is too large to decode safely ({exc})", where,
                         "resize it (tiles are 448 px, at most a few thousand pixels a side are used) or drop the "
                         "sample") from None
    except FileNotFoundError:
        raise MediaError(f"image not found: {path}", where, "check the path and that the file is there") from None
    except IsADirectoryError:
        raise MediaError(f"image {path} is a folder, not a file", where, "point the path at the image file") from None
    except PermissionError:
        raise MediaError(f"image {path} is not readable (permission denied)", where,
                         "give the training user read access") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        reason = "the file is empty (0 bytes)" if _empty(path) else str(exc)
        raise MediaError(f"cannot decode image {path}: {reason}", where,
                         "re-encode it as JPEG/PNG or drop the sample") from None


def _empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def tiles_to_tensor(tiles: Sequence[Image.Image], transform: ImageTransform, rng: np.random.Generator | None) -> torch.Tensor:
    """Stack transformed tiles into ``[T, 3, S, S]`` (one RNG draw per tile when augmenting, like the reference)."""
    return torch.stack([transform(t, rng) for t in tiles])
