"""The `watershed` method: finds synthetic nuclei, any tile size, same nuclei tiled or whole."""

from __future__ import annotations

import numpy as np
import pytest

from nucli.errors import UsageError
from nucli.export.labels import LabelImageSink
from nucli.models.registry import available, build_method
from nucli.pipeline import segment_store, store_from_array
from nucli.postprocess import BRIGHTFIELD, FLUORESCENCE, detect_polarity, filter_sizes, relabel_sequential
from nucli.stitching import stitch_store

HE_BACKGROUND = (225, 165, 205)  # eosin-pink tissue
HE_NUCLEUS = (90, 60, 140)  # hematoxylin-purple


def blob_labels(width, height, n, seed=0, r=(4, 9), touching_pairs=40):
    """Ground-truth nuclei: random ellipses, plus pairs of touching discs."""
    from skimage.draw import disk, ellipse

    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.int32)
    lab = 1
    for _ in range(touching_pairs):
        cy, cx, rad = rng.uniform(15, height - 15), rng.uniform(25, width - 25), rng.uniform(6, 8)
        a = disk((cy, cx - rad * 0.95), rad, shape=labels.shape)
        b = disk((cy, cx + rad * 0.95), rad, shape=labels.shape)
        if labels[a].any() or labels[b].any():
            continue
        labels[a] = lab
        labels[b] = lab + 1
        lab += 2
    tries = 0
    while lab <= n and tries < 50 * n:
        tries += 1
        rr, cc = ellipse(rng.uniform(0, height), rng.uniform(0, width), rng.uniform(*r), rng.uniform(*r),
                         shape=labels.shape, rotation=rng.uniform(0, np.pi))
        grown = (np.clip(rr, 1, height - 2), np.clip(cc, 1, width - 2))
        if len(rr) < 20 or labels[grown].any() or labels[np.clip(rr + 2, 0, height - 1), cc].any() \
                or labels[rr, np.clip(cc + 2, 0, width - 1)].any() or labels[np.clip(rr - 2, 0, height - 1), cc].any() \
                or labels[rr, np.clip(cc - 2, 0, width - 1)].any():
            continue
        labels[rr, cc] = lab
        lab += 1
    return labels


def render(labels, fg, bg, seed=0, noise=4.0):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    mask = ndi.gaussian_filter((labels > 0).astype(np.float32), 0.8)
    img = np.asarray(bg, np.float32) * (1 - mask[..., None]) + np.asarray(fg, np.float32) * mask[..., None]
    img += rng.normal(0, noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def f1_at_iou(gt: np.ndarray, pred: np.ndarray, thr: float = 0.5) -> float:
    fg = (gt > 0) & (pred > 0)
    pairs, inter = np.unique(np.stack([gt[fg], pred[fg]]), axis=1, return_counts=True)
    area_g = np.bincount(gt.ravel())
    area_p = np.bincount(pred.ravel())
    iou = inter / (area_g[pairs[0]] + area_p[pairs[1]] - inter)
    tp = int((iou > thr).sum())
    n_g, n_p = len(np.unique(gt[gt > 0])), len(np.unique(pred[pred > 0]))
    return 2 * tp / (n_g + n_p) if n_g + n_p else 1.0


@pytest.fixture(scope="module")
def he_image():
    gt = blob_labels(1100, 900, 900, seed=1)
    return gt, render(gt, HE_NUCLEUS, HE_BACKGROUND, seed=1)


def test_registered_with_no_weights():
    spec = available()["watershed"]
    assert spec.weights_file is None and not spec.needs_weights
    assert spec.config.overlap >= spec.config.max_nucleus_diameter_px
    with pytest.raises(UsageError, match="no weights"):
        build_method("watershed", weights="x.safetensors")


def test_finds_brightfield_nuclei(he_image):
    gt, img = he_image
    labels = build_method("watershed").segment(img)[0].labels
    assert labels.dtype == np.int32 and labels.shape == gt.shape
    assert f1_at_iou(gt, labels) > 0.9


def test_finds_fluorescence_nuclei():
    gt = blob_labels(600, 500, 300, seed=2)
    img = render(gt, (30, 60, 230), (6, 6, 10), seed=2, noise=3.0)
    assert detect_polarity(img) == FLUORESCENCE
    labels = build_method("watershed").segment(img)[0].labels
    assert f1_at_iou(gt, labels) > 0.9


def test_splits_touching_nuclei():
    from skimage.draw import disk

    gt = np.zeros((80, 120), np.int32)
    gt[disk((40, 45), 12)] = 1
    gt[disk((40, 68), 12)] = 2
    labels = build_method("watershed").segment(render(gt, HE_NUCLEUS, HE_BACKGROUND, noise=1.0))[0].labels
    assert f1_at_iou(gt, labels) == 1.0


def test_tiled_equals_untiled(tmp_path, he_image):
    gt, img = he_image
    method = build_method("watershed")
    whole = method.segment(img)[0].labels
    store = store_from_array(tmp_path / "run.zarr", img, tile_size=256, overlap=64)
    segment_store(store, method, progress=False)
    tiled = np.zeros_like(whole)
    stats = stitch_store(store, [LabelImageSink(array=tiled)], progress=False)
    f1 = f1_at_iou(whole, tiled)
    assert f1 >= 0.99, f1
    assert stats.residual_overlaps_removed <= 0.01 * stats.nuclei


@pytest.mark.parametrize("shape", [(1, 1), (5, 300), (37, 91), (256, 256), (0, 10)])
def test_any_tile_shape(shape):
    h, w = shape
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (2, h, w, 3), dtype=np.uint8)
    out = build_method("watershed").segment(tiles)
    assert len(out) == 2 and all(r.labels.shape == (h, w) and r.labels.dtype == np.int32 for r in out)


def test_blank_tiles_have_no_nuclei():
    m = build_method("watershed")
    assert m.segment(np.full((128, 128, 3), 245, np.uint8))[0].labels.max() == 0
    assert m.segment(np.zeros((128, 128, 3), np.uint8))[0].labels.max() == 0
    pink = np.broadcast_to(np.array(HE_BACKGROUND, np.uint8), (128, 128, 3)).copy()
    assert m.segment(pink)[0].labels.max() == 0


def test_objects_larger_than_max_diameter_are_dropped():
    from skimage.draw import disk

    m = build_method("watershed")
    gt = np.zeros((200, 200), np.int32)
    gt[disk((100, 100), 35)] = 1  # 70 px across > max_nucleus_diameter_px
    gt[disk((20, 20), 7)] = 2
    labels = m.segment(render(gt, HE_NUCLEUS, HE_BACKGROUND, noise=1.0))[0].labels
    from scipy import ndimage as ndi

    for sl in ndi.find_objects(labels):
        if sl is not None:
            assert max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) <= m.config.max_nucleus_diameter_px
    assert labels[20, 20] > 0 and labels[100, 100] == 0


def test_polarity_rule():
    assert detect_polarity(np.full((10, 10, 3), 230, np.uint8)) == BRIGHTFIELD
    assert detect_polarity(np.full((10, 10, 3), 20, np.uint8)) == FLUORESCENCE


def test_size_filter_and_relabel():
    lab = np.array([[5, 5, 0, 9], [5, 5, 0, 9], [0, 0, 0, 0], [7, 0, 0, 0]], np.int32)
    out = filter_sizes(lab, min_area=2, max_extent=2)
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out[:2, :2] == 1).all() and (out[:2, 3] == 2).all() and out[3, 0] == 0
    assert (relabel_sequential(np.array([[0, 40], [3, 40]])) == np.array([[0, 1], [2, 1]])).all()


def test_split_touching_region_by_region_equals_h_maxima_over_the_whole_tile(monkeypatch):
    """The h-maxima of split_touching run per region of the mask; the nuclei are those of skimage's
    h_maxima over the whole (float32) distance map."""
    from skimage.morphology import h_maxima

    import nucli.postprocess as pp

    def reference(mask, min_distance, h):
        with monkeypatch.context() as m:  # the same function, with h-maxima over the whole tile
            m.setattr(pp, "h_maxima_by_region", h_maxima)
            return pp.split_touching(mask, min_distance=min_distance, h=h)

    rng = np.random.default_rng(3)
    for trial in range(6):
        yy, xx = np.mgrid[:160, :160]
        mask = np.zeros((160, 160), bool)
        for _ in range(25):  # touching discs and ellipses, some cut by the border
            cy, cx = rng.uniform(-5, 165, 2)
            ry, rx = rng.uniform(3, 12, 2)
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        for h in (0.5, 1.0, 2.0):
            got = pp.split_touching(mask, min_distance=6, h=h)
            assert got.max() > 1
            assert np.array_equal(got, reference(mask, 6, h)), (trial, h)


def test_open3_and_fill_holes_are_scipys_opening_and_hole_filling():
    from scipy import ndimage as ndi

    from nucli.postprocess import fill_holes, open3

    rng = np.random.default_rng(11)
    for trial in range(60):
        shape = tuple(int(v) for v in rng.integers(1, 70, 2))
        m = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 3.0)) > rng.uniform(0.3, 0.7)
        assert np.array_equal(open3(m), ndi.binary_opening(m, structure=np.ones((3, 3), bool))), trial
        assert np.array_equal(fill_holes(m), ndi.binary_fill_holes(m)), trial
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    assert fill_holes(ring)[4, 4] and not open3(np.eye(5, dtype=bool)).any()
