"""Post-processing at the image's own resolution for images the network saw resized."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import resize

from nucli.autoscale import Zoomed, shrink_labels
from nucli.metrics import evaluate_image
from nucli.models.base import Method, MethodConfig, TileResult
from nucli.models.gensegnet.postprocess import PostprocessParams
from nucli.postprocess import resample_maps


def aji(true, pred):
    return evaluate_image(true, pred)["aji"]


def _ellipses(shape=(240, 240), n=(5, 5), seed=0):
    """Touching-free ellipses of 20-34 px at random angles: instance labels."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    lab = np.zeros(shape, np.int32)
    k = 0
    for cy in np.linspace(h / (2 * n[0]), h - h / (2 * n[0]), n[0]):
        for cx in np.linspace(w / (2 * n[1]), w - w / (2 * n[1]), n[1]):
            a, b, t = rng.uniform(10, 17), rng.uniform(7, 12), rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
            v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
            k += 1
            lab[((u / a) ** 2 + (v / b) ** 2 <= 1) & (lab == 0)] = k
    return lab


def _class_probs(lab, band=2):
    """(3, H, W) background/body/edge probabilities of a label image (edge: a band around each contour)."""
    from scipy import ndimage as ndi

    inside = lab > 0
    d_in = ndi.distance_transform_edt(inside)
    d_out = ndi.distance_transform_edt(~inside)
    edge = ((inside & (d_in <= band)) | (~inside & (d_out <= band))).astype(np.float32)
    body = (inside & ~(edge > 0)).astype(np.float32)
    return np.stack([1 - body - edge, body, edge]).astype(np.float32)


def _working(maps, zoom):
    """The maps a network would give on the image resized ``zoom`` times (bilinear on pixel centres)."""
    c, h, w = maps.shape
    return np.stack([resize(m, (round(h * zoom), round(w * zoom)), order=1, anti_aliasing=zoom < 1)
                     for m in maps]).astype(np.float32)


def test_resample_maps_samples_pixel_centres_like_skimage():
    rng = np.random.default_rng(3)
    small = rng.random((2, 30, 40)).astype(np.float32)
    ours = resample_maps(small, (60, 80))
    ref = np.stack([resize(m, (60, 80), order=1, mode="edge", anti_aliasing=False) for m in small])
    assert ours.shape == (2, 60, 80)
    assert np.abs(ours - ref).max() < 1e-5
    assert resample_maps(small, (30, 40)) is not None and np.array_equal(resample_maps(small, (30, 40)), small)


def test_scaled_params_keep_lengths_and_areas_in_physical_units():
    p = PostprocessParams(band_bias=1.0, min_seed_area=3, min_area=10, max_diameter=100, split_h=2.0)
    q = p.scaled(1.4)
    assert q.band_bias == pytest.approx(1.4) and q.split_h == pytest.approx(2.8)
    assert q.min_seed_area == 6 and q.min_area == 20 and q.max_diameter == 140
    assert q.body_threshold == p.body_threshold and p.scaled(1.0) is p


@pytest.mark.parametrize("zoom", [0.7, 0.5, 1.6])
def test_gensegnet_outlines_at_the_image_resolution_beat_enlarged_pixels(zoom):
    from nucli.models.gensegnet.method import GenSegNet
    from nucli.models.gensegnet.postprocess import instances_from_probs

    lab = _ellipses()
    rgb = np.zeros(lab.shape + (3,), np.uint8)  # dark: no pale-object filter
    work = _working(_class_probs(lab), zoom)
    m = GenSegNet.__new__(GenSegNet)
    Method.__init__(m, MethodConfig(name="gensegnet", params={}))
    m.params = PostprocessParams(min_area=10, max_diameter=128)
    native = m.postprocess_resampled(work[None], rgb)
    assert native.shape == lab.shape and native.dtype == np.int32
    assert native.max() == lab.max()
    nearest = shrink_labels(instances_from_probs(work, m.params), lab.shape)
    a_native, a_nearest = aji(lab, native), aji(lab, nearest)
    assert a_native > 0.95
    if zoom < 1:  # enlarged pixels lose most when the network saw the image shrunk
        assert a_native > a_nearest + 0.03


def test_harunet_outlines_at_the_image_resolution():
    from nucli.models.harunet import DEFAULT_CONFIG, HARUNetMethod

    lab = _ellipses(seed=1)
    from scipy import ndimage as ndi

    inside = lab > 0
    contour = (inside & (ndi.distance_transform_edt(inside) <= 2)).astype(np.float32)
    work = _working(np.stack([inside.astype(np.float32), contour]), 0.6)
    m = HARUNetMethod.__new__(HARUNetMethod)
    Method.__init__(m, DEFAULT_CONFIG)
    native = m.postprocess_resampled(work[None], np.zeros(lab.shape + (3,), np.uint8))
    assert native.shape == lab.shape and native.max() == lab.max()
    assert aji(lab, native) > 0.8


class _Counting(Method):
    """A method whose network is a threshold; counts its passes."""

    def __init__(self, own: bool):
        super().__init__(MethodConfig(name="fake", params={}))
        self.passes = 0
        self.own = own

    def infer(self, tiles):
        self.passes += 1
        return (np.asarray(tiles)[..., 0] > 100).astype(np.float32)[:, None]

    def postprocess(self, raw):
        from skimage.measure import label

        return [TileResult(labels=label(r[0] > 0.5).astype(np.int32)) for r in np.asarray(raw)]


class _Resampling(_Counting):
    def postprocess_resampled(self, raw, rgb):
        from skimage.measure import label

        return label(resample_maps(np.asarray(raw)[0], rgb.shape[:2])[0] > 0.5).astype(np.int32)


@pytest.mark.parametrize("cls", [_Counting, _Resampling])
def test_zoomed_runs_the_network_once_and_returns_labels_at_the_image_size(cls):
    lab = _ellipses()
    rgb = np.zeros(lab.shape + (3,), np.uint8)
    rgb[lab > 0] = 200
    m = cls(own=cls is _Resampling)
    z = Zoomed(m, rgb, 0.5)
    assert z.working().shape == (120, 120)
    out = z.native()
    assert out.shape == lab.shape and out.max() == lab.max()
    assert m.passes == 1
    assert aji(lab, out) > 0.8
