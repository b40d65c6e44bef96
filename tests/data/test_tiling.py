"""Tiling: grid choice (with the reference's tie rule), tile pixels, thumbnail, and the tensor transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from internvl_tune.constants import IMAGENET_MEAN, IMAGENET_STD
from internvl_tune.data import build_transform, choose_grid, dynamic_preprocess, num_tiles
from internvl_tune.data.images import candidate_grids, expand2square


def reference_rule(width, height, min_num, max_num, size=448):
    """Brute force of the reference's rule, written from its description: candidates are the grids of a Python set
    filled for n = min..max, i, j = 1..n, stably sorted by tile count; the first strictly closer ratio wins, an equal
    one replaces the best only if the image area exceeds half the candidate grid's full-resolution area."""
    grids = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    grids.add((i, j))
    best, best_diff = (1, 1), float("inf")
    for i, j in sorted(grids, key=lambda g: g[0] * g[1]):
        diff = abs(width / height - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * size * size * i * j:
            best = (i, j)
    return best


@pytest.mark.parametrize(
    "size,max_num,grid",
    [
        ((800, 600), 6, (3, 2)),       # ratio 4/3: 3/2 is closest among grids of <= 6 tiles
        ((448, 448), 12, (1, 1)),      # square ties 2x2, 3x3 but is too small to be blown up
        ((1000, 1000), 12, (3, 3)),    # 1e6 px > half of 2x2 (401k) and of 3x3 (903k) at 448: 3x3 wins the tie
        ((1000, 1000), 6, (2, 2)),
        ((2000, 500), 12, (4, 1)),     # 4:1 strip
        ((300, 900), 12, (1, 3)),      # tall
        ((100, 5000), 6, (1, 6)),      # extreme: as tall as allowed
        ((640, 427), 1, (1, 1)),       # budget of one tile
    ],
)
def test_grid_hand_cases(size, max_num, grid):
    assert choose_grid(*size, 1, max_num) == grid
    assert reference_rule(*size, 1, max_num) == grid


def test_equal_tile_count_tie_follows_reference_order():
    # min = max = 2 leaves (1,2) and (2,1); a 5:4 image is equally far (0.75) from ratios 0.5 and 2.
    assert set(candidate_grids(2, 2)) == {(1, 2), (2, 1)}
    assert choose_grid(500, 400, 2, 2) == reference_rule(500, 400, 2, 2)


@settings(max_examples=300, deadline=None)
@given(
    w=st.integers(1, 6000), h=st.integers(1, 6000), min_num=st.integers(1, 3), extra=st.integers(0, 40),
    thumb=st.booleans(),
)
def test_grid_matches_reference_rule(w, h, min_num, extra, thumb):
    max_num = min_num + extra
    cols, rows = choose_grid(w, h, min_num, max_num)
    assert (cols, rows) == reference_rule(w, h, min_num, max_num)
    assert min_num <= cols * rows <= max_num
    expected = cols * rows + (1 if thumb and cols * rows > 1 else 0)
    assert num_tiles(w, h, min_num, max_num, thumb) == expected


@settings(max_examples=25, deadline=None)
@given(w=st.integers(8, 1400), h=st.integers(8, 1400), max_num=st.integers(1, 8), thumb=st.booleans())
def test_dynamic_preprocess_tiles_are_crops_of_the_resized_image(w, h, max_num, thumb):
    size = 28  # small tiles keep the property test fast; the geometry is the same as with 448
    rng = np.random.default_rng(w * 10_000 + h)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    tiles = dynamic_preprocess(image, 1, max_num, size, thumb)
    cols, rows = choose_grid(w, h, 1, max_num, size)
    assert len(tiles) == num_tiles(w, h, 1, max_num, thumb, size)
    resized = np.asarray(image.resize((cols * size, rows * size), Image.Resampling.BICUBIC))
    for k in range(cols * rows):  # row-major
        r, c = divmod(k, cols)
        assert np.array_equal(np.asarray(tiles[k]), resized[r * size:(r + 1) * size, c * size:(c + 1) * size])
    if thumb and cols * rows > 1:
        assert np.array_equal(np.asarray(tiles[-1]), np.asarray(image.resize((size, size), Image.Resampling.BICUBIC)))


def test_transform_normalises_like_totensor_normalize():
    image = Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    out = build_transform(False, 4)(image)
    resized = np.asarray(image.resize((4, 4), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert out.shape == (3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6)


def test_grayscale_is_converted_and_pad2square_fills_with_mean():
    gray = Image.new("L", (10, 4), 0)
    padded = expand2square(gray.convert("RGB"), (124, 116, 104))
    assert padded.size == (10, 10) and padded.getpixel((0, 0)) == (124, 116, 104) and padded.getpixel((0, 3)) == (0, 0, 0)
    out = build_transform(False, 8, pad2square=True)(gray)
    assert out.shape == (3, 8, 8)
    assert torch.allclose(out[:, 0, 0], torch.zeros(3), atol=0.02)  # the mean colour normalises to ~0


def test_jpeg_augmentation_is_reproducible_from_the_rng():
    ramp = np.linspace(0, 255, 32, dtype=np.uint8)
    image = Image.fromarray(np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, ::-1]), -1))
    t = build_transform(True, 32)
    a = t(image, np.random.default_rng([1, 2, 3]))
    b = t(image, np.random.default_rng([1, 2, 3]))
    plain = build_transform(False, 32)(image)
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)  # re-encoded at quality 75..100, so not bit-identical to the original
    assert (a - plain).abs().mean() < 0.1
