"""Pale brightfield objects (eosin-pink stroma outlined as nuclei) are dropped by methods that ask for it."""

from __future__ import annotations

import numpy as np
import pytest

from nucli.postprocess import drop_pale, hematoxylin
from nucli.synthetic import NUCLEUS, TISSUE

PINK = (200, 90, 150)  # eosin-rich stroma: darker than the background, little hematoxylin
BROWN = (140, 90, 60)  # a DAB-positive (IHC) nucleus: little hematoxylin too, but brown
LAVENDER = (200, 195, 225)  # a pale hematoxylin-stained nucleus: little hematoxylin, but blue above red
WHITE = (245, 245, 245)


def scene():
    """An H&E-like picture: a purple nucleus and a pink stroma blob on white; labels for both."""
    img = np.empty((64, 96, 3), np.uint8)
    img[:] = WHITE
    yy, xx = np.mgrid[0:64, 0:96]
    nucleus = (yy - 32) ** 2 + (xx - 24) ** 2 <= 100
    stroma = (yy - 32) ** 2 + (xx - 70) ** 2 <= 100
    img[nucleus] = NUCLEUS
    img[stroma] = PINK
    labels = np.zeros((64, 96), np.int32)
    labels[stroma] = 1
    labels[nucleus] = 2
    return img, labels


def test_the_colours_are_what_the_test_means():
    h = hematoxylin(np.array([[NUCLEUS, PINK, TISSUE, BROWN]], np.uint8))[0]
    assert h[0] > 0.08 and h[1] < 0.03 and h[2] < 0.03 and h[3] < 0.03


@pytest.mark.parametrize("colour", [BROWN, LAVENDER])
def test_pale_nuclei_of_other_colours_are_kept(colour):
    img, labels = scene()
    img[labels == 1] = colour  # the second object is an IHC-positive or a pale nucleus, not stroma
    assert hematoxylin(np.array([[colour]], np.uint8))[0, 0] < 0.03
    assert (drop_pale(labels, img, 0.03) == labels).all()


def test_drop_pale_keeps_nuclei_and_renumbers():
    img, labels = scene()
    out = drop_pale(labels, img, 0.03)
    assert out.max() == 1 and (out > 0).sum() == (labels == 2).sum()
    assert drop_pale(labels, img, 0.0) is labels  # off
    assert (drop_pale(labels, img, 0.03, brightfield=False) == labels).all()  # fluorescence: untouched
    dark = 255 - img  # a dark background: detected as fluorescence, untouched
    assert (drop_pale(labels, dark, 0.03) == labels).all()


@pytest.fixture
def components_method(monkeypatch):
    """A registered test method: connected components of non-white pixels, with a pale-nucleus setting."""
    from nucli.models import registry
    from nucli.models.base import Method, MethodConfig, TileResult

    class Components(Method):
        def postprocess(self, raw):
            from skimage.measure import label

            return [TileResult(labels=label(tile.min(axis=-1) < 230).astype(np.int32)) for tile in raw]

    registry.available()

    def register(min_od):
        spec = registry.MethodSpec(
            name="components-pale", summary="test only",
            config=MethodConfig(name="components-pale", params={"min_hematoxylin_od": min_od}),
            builder=lambda config, weights, device: Components(config),
        )
        monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
        return spec.name

    return register


def test_stitching_drops_pale_nuclei_when_the_method_asks(components_method):
    from nucli.api import segment_array

    img, _ = scene()
    labels, table = segment_array(img, components_method(0.0))
    assert labels.max() == 2 and len(table["label"]) == 2
    labels, table = segment_array(img, components_method(0.03))
    assert labels.max() == 1 and len(table["label"]) == 1
    assert table["hematoxylin_mean"][0] > 0.08


def test_gensegnet_whole_image_segment_drops_pale(monkeypatch):
    from nucli.models.base import TileResult
    from nucli.models.registry import build_method

    m = build_method("gensegnet")
    assert m.config.params["min_hematoxylin_od"] == 0.03
    img, labels = scene()
    monkeypatch.setattr(type(m), "postprocess", lambda self, raw: [TileResult(labels=labels.copy())])
    out = m.segment(img[None])[0].labels
    assert out.max() == 1 and (out > 0).sum() == (labels == 2).sum()


GLASS_SPECK = (241, 240, 242)  # faint texture on empty glass that a per-tile stretch made look like a nucleus


def glass_scene():
    """A purple nucleus, a pale lavender nucleus and a glass-coloured 'object' on the glass."""
    img, labels = scene()
    yy, xx = np.mgrid[0:64, 0:96]
    speck = (yy - 10) ** 2 + (xx - 50) ** 2 <= 36
    img[labels == 1] = LAVENDER
    img[speck] = GLASS_SPECK
    labels[speck] = 3
    return img, labels


def test_objects_as_bright_as_the_glass_are_dropped_pale_nuclei_kept():
    from nucli.postprocess import glass_colour, is_blank

    img, labels = glass_scene()
    assert glass_colour(img) == pytest.approx((245.0, 245.0, 245.0))
    assert is_blank(*GLASS_SPECK, background=(245, 245, 245))
    assert not is_blank(*LAVENDER, background=(245, 245, 245))  # pale, but it absorbs in red and green
    assert not is_blank(*BROWN) and not is_blank(*NUCLEUS)
    out = drop_pale(labels, img, 0.03)
    assert out.max() == 2  # the speck is gone; both nuclei stay
    assert ((out > 0) == ((labels == 1) | (labels == 2))).all()
    assert (drop_pale(labels, img, 0.03, brightfield=False) == labels).all()  # fluorescence: untouched


def test_stitching_drops_glass_objects_when_the_method_asks(components_method):
    from nucli.api import segment_array

    img, _ = glass_scene()
    # the test method finds objects darker than 230; make the speck one of them for this check
    img[(np.mgrid[0:64, 0:96][0] - 10) ** 2 + (np.mgrid[0:64, 0:96][1] - 50) ** 2 <= 36] = (229, 229, 229)
    img[(img == WHITE).all(axis=-1)] = (236, 236, 236)  # greyer glass: the speck is 3 % darker than it
    labels, table = segment_array(img, components_method(0.0))
    assert labels.max() == 3
    labels, table = segment_array(img, components_method(0.03))
    assert labels.max() == 2 and len(table["label"]) == 2  # glass speck dropped, lavender nucleus kept
