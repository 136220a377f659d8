"""The zoom search of weights trained at one working scale, and `auto` as their default."""

from __future__ import annotations

import numpy as np
import pytest

from nucli.autoscale import (AUTO, NATIVE, auto_by_default, choose_zoom, estimate_for, parse_mpp, resolve_mode,
                             scan_zoom, segment_image_auto)
from nucli.models.base import MethodConfig, TileResult

SCANNING = MethodConfig(name="fake", mpp=0.35, nucleus_diameter_px=17.0,
                        params={"auto_scale": {"ratio": 1.0, "shrink": True}})
OLD = MethodConfig(name="gensegnet", mpp=0.5, nucleus_diameter_px=19.0, params={})


def _discs(shape, diameter, spacing):
    h, w = shape
    lab = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:h, :w]
    r = diameter / 2.0
    n = 0
    for cy in np.arange(r + 2, h - r - 2, spacing):
        for cx in np.arange(r + 2, w - r - 2, spacing):
            n += 1
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = n
    return lab


def _fragmenting_net(true_diameter: float, calls: list[float]):
    """A network trained on 17 px nuclei: nuclei shown larger than 1.5x that come out as 17 px pieces."""
    def at(z: float):
        calls.append(z)
        d = true_diameter * z
        shown = 17.0 if d > 1.5 * 17.0 else d
        return [_discs((256, 256), max(shown, 2.0), max(shown, 2.0) + 4)]
    return at


def test_scan_finds_large_nuclei_that_one_pass_cannot_see():
    calls: list[float] = []
    at = _fragmenting_net(60.0, calls)  # 60 px nuclei (a 63x objective)
    one_pass = estimate_for(SCANNING, at(1.0))
    assert one_pass.zoom == 1.0  # the pieces look like nuclei of the trained size
    est, z, labels = scan_zoom(at, 17.0)
    assert z == est.zoom == pytest.approx(0.35)  # 0.25 shows 15 px nuclei (< 17), 0.35 shows 21 px
    assert est.median_diameter_px == pytest.approx(60.0, rel=0.1)  # in the input's own pixels
    assert labels and labels[0].max() > 0


def test_scan_enlarges_small_nuclei_and_stops_at_the_first_zoom_that_suffices():
    calls: list[float] = []
    est, z, _ = scan_zoom(_fragmenting_net(9.0, calls), 17.0, step_up=False, reject=False)
    assert z == pytest.approx(2.0)  # 9 * 1.5 = 13.5 < 17 <= 9 * 2 = 18
    assert calls[-1] == pytest.approx(2.0) and 2.5 not in calls  # stops there


def test_scan_steps_one_zoom_up_while_the_nuclei_stay_whole():
    calls: list[float] = []
    est, z, labels = scan_zoom(_fragmenting_net(9.0, calls), 17.0)
    # 2.0 reaches 18 px; at 2.5 the nuclei are 22.5 px, still whole (fewer, larger): one step up
    assert z == est.zoom == pytest.approx(2.5)
    assert calls[-1] == pytest.approx(2.5) and 3.0 not in calls  # one step at most
    assert est.median_diameter_px == pytest.approx(9.0, rel=0.1)
    assert labels and labels[0].max() > 0


def test_scan_does_not_step_up_into_pieces():
    calls: list[float] = []
    est, z, _ = scan_zoom(_fragmenting_net(14.0, calls), 17.0)
    # 1.25 shows 17.5 px nuclei; at 1.5 (21 px) they are still whole and taken; one step only
    assert z == pytest.approx(1.5) and 2.0 not in calls
    calls.clear()
    est, z, _ = scan_zoom(_fragmenting_net(60.0, calls), 17.0)
    assert z == pytest.approx(0.35)  # 0.5 would show 30 px nuclei, cut into pieces: not taken
    assert 0.5 in calls


def _smear_net(calls: list[float]):
    """A cytology smear: at a tiny zoom the network takes whole cells (25 px there) for nuclei; from
    0.35 up it finds the real nuclei, 20 px across in the input."""
    def at(z: float):
        calls.append(z)
        if z < 0.3:
            return [_discs((256, 256), 25.0, 40.0)]
        return [_discs((256, 256), 20.0 * z, 20.0 * z + 6)]
    return at


def test_scan_rejects_a_pick_whose_objects_shrink_one_zoom_up():
    calls: list[float] = []
    est, z, _ = scan_zoom(_smear_net(calls), 17.0, step_up=False, reject=False)
    assert z == pytest.approx(0.25)  # the cells look like nuclei of the reference size
    calls.clear()
    est, z, labels = scan_zoom(_smear_net(calls), 17.0)
    # 0.25 is rejected (0.35 shows 7 px objects); 1.0 is the first to show nuclei of 17 px or more
    # (20 px; the 17 px discs of 0.85 measure just under 17), and 1.25 (25 px, whole) is taken
    assert z == est.zoom == pytest.approx(1.25)
    assert est.median_diameter_px == pytest.approx(20.0, rel=0.1)
    assert len(calls) == len(set(calls))  # each zoom segmented once
    assert labels and labels[0].max() > 0


def test_scan_rejects_cells_that_shrink_into_nuclei_over_two_zooms():
    """Cells at 0.25 (25 px); at 0.35 the network still merges most nuclei (18 px objects, only 0.72x);
    from 0.5 up it finds the real nuclei, 20 px across in the input."""
    import nucli.autoscale as A

    def at(z: float):
        if z < 0.3:
            return [_discs((256, 256), 25.0, 40.0)]
        if z < 0.4:
            return [_discs((256, 256), 18.0, 30.0)]
        return [_discs((256, 256), 20.0 * z, 20.0 * z + 6)]

    est, z, _ = scan_zoom(at, 17.0)
    assert z >= 1.0  # 0.5 shows 10 px objects (< 0.6 x 25): 0.25 is rejected, and so is 0.35
    old = A.REJECT_TWO_AHEAD_BELOW
    try:
        A.REJECT_TWO_AHEAD_BELOW = 0.0  # one zoom ahead only: 18 px is not a shrink below 0.6x
        est, z, _ = scan_zoom(at, 17.0)
        assert z == pytest.approx(0.25)
    finally:
        A.REJECT_TWO_AHEAD_BELOW = old


def test_scan_without_nuclei_keeps_the_native_size():
    est, z, labels = scan_zoom(lambda z: [np.zeros((64, 64), np.int32)], 17.0)
    assert z == 1.0 and est.n_nuclei == 0 and labels == []


def test_choose_zoom_scans_only_for_weights_with_a_working_scale():
    calls: list[float] = []
    est, _ = choose_zoom(OLD, _fragmenting_net(60.0, calls))
    assert calls == [1.0] and est.zoom >= 1.0  # older weights: one pass, never shrunk
    calls.clear()
    est, _ = choose_zoom(SCANNING, _fragmenting_net(60.0, calls))
    assert len(calls) > 1 and est.zoom < 1.0


def test_segment_image_auto_reuses_the_labels_of_the_chosen_zoom():
    class Fake:
        config = SCANNING
        sizes: list = []

        def segment(self, tiles):
            t = np.asarray(tiles)[0]
            self.sizes.append(t.shape[0])
            from skimage.measure import label
            return [TileResult(labels=label(t[..., 0] > 100).astype(np.int32))]

    lab = _discs((300, 300), 41, 48)
    rgb = np.zeros((300, 300, 3), np.uint8)
    rgb[lab > 0] = 200
    m = Fake()
    out, est = segment_image_auto(m, rgb)
    # 41 px: 0.35 shows 14 px, 0.5 shows 20 px; 0.6 (25 px, as many, still whole) is one step up
    assert est.zoom == pytest.approx(0.6)
    # no extra pass after the search (the last pass, 0.7, is the reject test's second look ahead)
    assert 180 in m.sizes and m.sizes[-1] == 210 and len(m.sizes) == len(set(m.sizes))
    assert out.shape == (300, 300) and len(np.unique(out)) - 1 == lab.max()


def test_mpp_modes():
    assert parse_mpp("native") == NATIVE and parse_mpp(" Auto ") == AUTO
    assert auto_by_default(SCANNING) and not auto_by_default(OLD)
    assert resolve_mode(None, SCANNING) == AUTO
    assert resolve_mode(None, OLD) is None
    assert resolve_mode(NATIVE, SCANNING) is None
    assert resolve_mode(0.5, SCANNING) == 0.5
    from nucli.errors import UsageError
    with pytest.raises(UsageError):
        parse_mpp("nativ")
