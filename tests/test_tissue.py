"""Tissue detection: scores, masks, and which grid tiles touch tissue."""

from __future__ import annotations

import numpy as np
import pytest

from nucli.slide import open_slide
from nucli.synthetic import BACKGROUND, NUCLEUS, TISSUE, make_tissue, write_pyramidal_tiff
from nucli.tiling.grid import TileGrid
from nucli.tiling.tissue import mask_from_score, tiles_with_tissue, tissue_mask, tissue_score


def _disk(shape, cx, cy, r):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_bright_field_disk_is_found_and_specks_removed():
    img = np.empty((200, 300, 3), np.uint8)
    img[:] = BACKGROUND
    disk = _disk(img.shape, 150, 100, 60)
    img[disk] = TISSUE
    img[10:13, 10:13] = NUCLEUS  # a 3x3 px speck: 9 px * 4 µm² = 36 µm² < 1000 µm²
    mask = mask_from_score(tissue_score(img, False), px_um=2.0, min_area_um2=1000, dilate_um=0)
    assert _iou(mask, disk) > 0.97
    assert not mask[:20, :20].any()


def test_all_background_gives_an_empty_mask():
    rng = np.random.default_rng(0)
    for level in (243, 222):  # bright and greyish glass, with noise
        img = np.clip(rng.normal(level, 2, (128, 128, 3)), 0, 255).astype(np.uint8)
        assert not mask_from_score(tissue_score(img, False), px_um=2.0, min_area_um2=100, dilate_um=0).any()
    white = np.full((64, 64, 3), 255, np.uint8)
    assert not mask_from_score(tissue_score(white, False), px_um=2.0, min_area_um2=100, dilate_um=0).any()


def test_image_that_is_all_tissue_stays_all_tissue():
    """Otsu alone would split pale from dark tissue; the clamp keeps the pale part."""
    img = np.empty((100, 100, 3), np.uint8)
    img[:] = (232, 200, 222)  # pale stroma
    img[:, 50:] = (120, 60, 140)  # dense nuclei
    mask = mask_from_score(tissue_score(img, False), px_um=2.0, min_area_um2=100, dilate_um=0)
    assert mask.mean() > 0.99


def test_dark_field_bright_nuclei_are_found():
    img = np.zeros((150, 150, 3), np.uint8)
    blobs = _disk(img.shape, 40, 40, 6) | _disk(img.shape, 110, 90, 8)
    img[blobs] = (0, 0, 200)  # blue (DAPI-like) nuclei on black
    mask = mask_from_score(tissue_score(img, True), px_um=1.0, min_area_um2=30, dilate_um=0)
    near = _disk(img.shape, 40, 40, 8) | _disk(img.shape, 110, 90, 10)
    assert mask[blobs].all() and not mask[~near].any()


def test_dilation_grows_the_mask_by_the_requested_distance():
    score = np.zeros((101, 101), np.float32)
    score[45:56, 45:56] = 1.0
    base = mask_from_score(score, px_um=1.0, min_area_um2=0, dilate_um=0)
    grown = mask_from_score(score, px_um=1.0, min_area_um2=0, dilate_um=10)
    assert base.sum() < grown.sum()
    ys, xs = np.nonzero(grown)
    assert xs.min() == pytest.approx(45 - 10, abs=1) and xs.max() == pytest.approx(55 + 10, abs=1)


def test_tiles_with_tissue_on_a_hand_made_mask():
    grid = TileGrid(1000, 600, 256, 32)  # xs 0,224,448,672,744 ys 0,224,344
    assert grid.xs == [0, 224, 448, 672, 744] and grid.ys == [0, 224, 344]
    mask = np.zeros((60, 100), bool)  # mask px = 10 working px (downsample 2 -> 20 level-0 px)
    mask[35, 50] = True  # working (500..510, 350..360)
    got = tiles_with_tissue(grid, mask, mask_downsample=20.0, downsample=2.0)
    # tiles whose x-span [x, x+256) meets [500, 510) and y-span meets [350, 360)
    want = [(r, c) for r, y in enumerate(grid.ys) for c, x in enumerate(grid.xs)
            if x < 510 and x + 256 > 500 and y < 360 and y + 256 > 350]
    assert got == want == [(1, 2), (2, 2)]
    assert tiles_with_tissue(grid, np.zeros_like(mask), 20.0, 2.0) == []


def test_tissue_mask_of_a_synthetic_slide_matches_its_islands(tmp_path):
    tissue = make_tissue(4096, 3072, 2, seed=5, island_radius=(400, 600))
    path = write_pyramidal_tiff(tmp_path / "s.svs", tissue.render, 4096, 3072, mpp=0.5, compression="jpeg")
    with open_slide(path) as s:
        mask, d = tissue_mask(s, dilate_um=0)
        assert d == 4.0  # the 1024 x 768 pyramid level, used as is
        assert mask.shape == (768, 1024)
        yy, xx = np.mgrid[0:768, 0:1024]
        truth = tissue.in_tissue((xx + 0.5) * d, (yy + 0.5) * d)
        assert _iou(mask, truth) > 0.95
        grown, _ = tissue_mask(s)  # default 25 µm dilation
        assert grown.sum() > mask.sum() and (grown | truth).sum() == grown.sum()


def test_tissue_mask_on_the_real_slide(cmu_slide):
    with open_slide(cmu_slide) as s:
        mask, d = tissue_mask(s)
        assert mask.shape == (int(np.ceil(2967 / d)), int(np.ceil(2220 / d)))
        assert 0.3 < mask.mean() < 0.7  # a strip of tissue with glass on both sides
        h, w = mask.shape
        assert mask[int(h * 0.75), int(w * 0.5)]  # the tissue body
        assert not mask[int(h * 0.15), int(w * 0.1)] and not mask[int(h * 0.6), int(w * 0.95)]  # glass
