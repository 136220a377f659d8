"""Training targets of GeNSeg-Net on hand-made label images."""

from __future__ import annotations

import numpy as np
import pytest

from nucli.training.targets import BACKGROUND, BODY, EDGE, PENDING_EDGE_VALUE, RIM_VALUE, class_map, ideal_image


def _square(size=40, box=(10, 30, 10, 30)):
    lab = np.zeros((size, size), np.int32)
    y0, y1, x0, x1 = box
    lab[y0:y1, x0:x1] = 1
    return lab


def test_edge_band_is_two_px_inside_and_two_px_outside():
    lab = _square()
    cm = class_map(lab, half_width=2)
    row = cm[20]  # a row through the middle of the square (cols 10..29)
    assert list(row[6:14]) == [BACKGROUND, BACKGROUND, EDGE, EDGE, EDGE, EDGE, BODY, BODY]
    assert list(row[26:34]) == [BODY, BODY, EDGE, EDGE, EDGE, EDGE, BACKGROUND, BACKGROUND]
    # band width is 4 everywhere along the straight sides
    assert ((cm[12:28, :] == EDGE).sum(axis=1)[4:-4] == 8).all()


@pytest.mark.parametrize("half", [1, 2, 3])
def test_edge_band_width_follows_half_width(half):
    cm = class_map(_square(), half_width=half)
    row = cm[20]
    assert (row[10 - half:10 + half] == EDGE).all()
    assert row[10 - half - 1] == BACKGROUND and row[10 + half] == BODY


def test_touching_nuclei_get_separated_bodies_and_shared_pending_edge():
    lab = np.zeros((30, 40), np.int32)
    lab[5:25, 5:20] = 1
    lab[5:25, 20:35] = 2
    cm = class_map(lab)
    # the bodies of the two nuclei are separated by a 4 px band around the shared boundary
    from scipy import ndimage as ndi

    bodies, n = ndi.label(cm == BODY)
    assert n == 2
    assert (cm[15, 18:22] == EDGE).all()
    ideal = ideal_image(lab)
    # pixels on either side of the shared boundary get the single pending-edge value
    assert np.allclose(ideal[6:24, 19], PENDING_EDGE_VALUE)
    assert np.allclose(ideal[6:24, 20], PENDING_EDGE_VALUE)
    # not on the outer boundary
    assert np.allclose(ideal[15, 5], RIM_VALUE)


def test_ideal_image_decreases_from_centre_to_edge_and_background_is_zero():
    lab = _square()
    ideal = ideal_image(lab)
    assert ideal[lab == 0].max() == 0.0
    assert ideal[20, 20] == pytest.approx(1.0, abs=0.06)
    profile = ideal[20, 10:20]
    assert np.all(np.diff(profile) >= 0)  # rises from the edge towards the centre
    assert profile[0] == pytest.approx(RIM_VALUE)


def test_tiny_nucleus_keeps_a_body_seed():
    lab = np.zeros((20, 20), np.int32)
    lab[8:11, 8:11] = 1  # 3x3: everything lies in the edge band
    cm = class_map(lab)
    assert (cm == BODY).sum() >= 1
    assert cm[9, 9] == BODY


def test_empty_labels():
    lab = np.zeros((16, 16), np.int32)
    assert not ideal_image(lab).any()
    assert not class_map(lab).any()
