"""``--mpp auto``: the zoom rule, whole images (evaluate, segment_array) and slides without a pixel size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.io
from typer.testing import CliRunner

from nucli import autoscale
from nucli.autoscale import (LADDER, MIN_NUCLEI, diameters, estimate, parse_mpp, segment_image_auto, shrink_labels,
                             zoom_for)
from nucli.cli import app
from nucli.errors import UsageError
from nucli.synthetic import ellipse_image


@pytest.fixture
def ratios(monkeypatch):
    """Auto-zoom rules for the test methods (the shipped ones are chosen on DSB2018 val per method)."""
    table = {"watershed": 1.25, "rec": 1.25}
    monkeypatch.setattr(autoscale, "AUTO_RATIOS", table)
    return table


def discs(shape, radius, step):
    """Dark discs of ``radius`` on a pink background, ``step`` px apart (an H&E-like image)."""
    centers = [(x, y) for y in range(step // 2, shape[0] - radius, step) for x in range(step // 2, shape[1] - radius, step)]
    return ellipse_image(shape, centers, radius=radius)


def test_zoom_rule_snaps_to_the_ladder_and_never_shrinks():
    ref = 20.0
    assert zoom_for(20.0, 50, ref) == 1.0
    assert zoom_for(40.0, 50, ref) == 1.0  # large nuclei: never shrunk
    assert zoom_for(10.0, 50, ref) == 2.0
    assert zoom_for(16.0, 50, ref) == 1.25
    assert zoom_for(2.0, 50, ref) == max(LADDER)  # capped
    assert zoom_for(10.0, MIN_NUCLEI - 1, ref) == 1.0  # too few nuclei to judge
    assert zoom_for(None, 0, ref) == 1.0


def test_estimate_uses_median_equivalent_diameter():
    lab = np.zeros((60, 60), np.int32)
    yy, xx = np.mgrid[0:60, 0:60]
    for i, (cy, cx) in enumerate([(10, 10), (10, 40), (40, 10), (40, 40), (25, 25)], start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = i
    d = diameters(lab)
    assert d.size == 5 and np.allclose(d, np.sqrt(4 * (lab == 1).sum() / np.pi))
    est = estimate([lab], nucleus_diameter_px=16.0, ratio=1.25)
    assert est.n_nuclei == 5 and est.reference_px == pytest.approx(20.0)
    assert est.zoom == zoom_for(est.median_diameter_px, 5, 20.0) > 1.0
    assert est.to_dict()["zoom"] == est.zoom


def test_shrink_labels_keeps_ids_consecutive():
    lab = np.zeros((30, 30), np.int32)
    lab[0:10, 0:10] = 1
    lab[14, 14] = 2  # one pixel: vanishes when shrunk 3x
    lab[20:30, 20:30] = 3
    small = shrink_labels(lab, (10, 10))
    assert small.shape == (10, 10) and sorted(np.unique(small)) == [0, 1, 2]


def test_parse_mpp():
    assert parse_mpp(None) is None
    assert parse_mpp("AUTO") == "auto"
    assert parse_mpp("0.25") == 0.25
    for bad in ("fast", "-1", "nan", "0"):
        with pytest.raises(UsageError, match="--mpp"):
            parse_mpp(bad)


class _Recorder:
    """A method stand-in: thresholds dark pixels; records the tile shapes it saw."""

    def __init__(self, diameter=16.0):
        from nucli.models.base import MethodConfig

        self.config = MethodConfig(name="rec", nucleus_diameter_px=diameter)
        self.shapes = []

    def segment(self, tiles):
        from skimage.measure import label

        from nucli.models.base import TileResult

        self.shapes.append(tiles.shape[1:3])
        return [TileResult(labels=label(t[..., 0] < 150).astype(np.int32)) for t in tiles]


def test_segment_image_auto_enlarges_small_nuclei_only(ratios):
    small = discs((96, 96), radius=4, step=16)  # ~8 px nuclei, a 16 px method: enlarged about 2.5x
    m = _Recorder()
    labels, est = segment_image_auto(m, small)
    side = round(96 * est.zoom)
    assert est.zoom > 1.5 and m.shapes == [(96, 96), (side, side)]
    assert labels.shape == (96, 96) and labels.max() == est.n_nuclei == 36
    big = discs((96, 96), radius=11, step=32)  # ~23 px nuclei: kept at 1x, first pass reused
    m = _Recorder()
    labels, est = segment_image_auto(m, big)
    assert est.zoom == 1.0 and m.shapes == [(96, 96)] and labels.max() == 9
    del ratios["rec"]  # a method without a rule: the first pass, nothing enlarged
    m = _Recorder()
    labels, est = segment_image_auto(m, small)
    assert est is None and m.shapes == [(96, 96)] and labels.max() == 36


def test_segment_array_auto(monkeypatch, ratios):
    import nucli.api as api

    img = discs((128, 128), radius=4, step=16)
    labels, table = api.segment_array(img, "watershed")
    zooms = []
    resize = api._resize_rgb
    monkeypatch.setattr(api, "_resize_rgb", lambda rgb, d: zooms.append(1 / d) or resize(rgb, d))
    labels_auto, table_auto = api.segment_array(img, "watershed", mpp="auto")
    assert len(zooms) == 1 and zooms[0] > 1.5  # ~8 px discs, 16 px method: one more pass, enlarged
    assert labels_auto.shape == img.shape[:2] and labels_auto.max() == labels.max() == 64
    # measurements are in the image's own pixels: a disc of radius 4 has ~50 px
    assert np.median(table_auto["area_px2"]) == pytest.approx(np.median(table["area_px2"]), rel=0.2)
    with pytest.raises(UsageError):
        api.segment_array(img, "watershed", mpp="big")


def test_evaluate_dataset_auto(tmp_path, ratios):
    import imageio.v3 as iio
    import tifffile

    split = tmp_path / "test"
    (split / "images").mkdir(parents=True)
    (split / "labels").mkdir()
    img = discs((128, 128), radius=4, step=16)
    from skimage.measure import label

    iio.imwrite(split / "images" / "a.png", img)
    tifffile.imwrite(split / "labels" / "a.tif", label(img[..., 0] < 150).astype(np.uint16))
    runner = CliRunner()
    plain = runner.invoke(app, ["evaluate", "--dataset", str(split), "--method", "watershed", "--json"])
    auto = runner.invoke(app, ["evaluate", "--dataset", str(split), "--method", "watershed", "--mpp", "auto",
                               "--json", "-o", str(tmp_path / "r.json")])
    assert plain.exit_code == 0 and auto.exit_code == 0, auto.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["mpp"] == "auto" and report["auto_zoom"]["images_enlarged"] == 1
    assert report["auto_zoom"]["ratio"] == 1.25
    assert report["aggregate"]["mean_over_images"]["aji"] > 0.8
    bad = runner.invoke(app, ["evaluate", "--dataset", str(split), "--method", "watershed", "--mpp", "0.5"])
    assert bad.exit_code == 1 and "auto" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["evaluate", str(split / "labels"), str(split / "labels"), "--mpp", "auto"])
    assert bad.exit_code == 1 and "--dataset" in bad.output


def test_tile_auto_enlarges_an_image_without_pixel_size(tmp_path, ratios):
    from nucli.tiling.store import RunStore
    from nucli.tiling.tiler import tile_slide

    img = discs((300, 400), radius=5, step=20)  # ~10 px nuclei; watershed works at 16 px -> about 2x
    skimage.io.imsave(tmp_path / "img.png", img, check_contrast=False)
    res = CliRunner().invoke(app, ["tile", str(tmp_path / "img.png"), "-o", str(tmp_path / "a.zarr"),
                                   "--method", "watershed", "--mpp", "auto", "--no-tissue-mask", "--quiet"])
    assert res.exit_code == 0, res.output
    meta = RunStore.open(tmp_path / "a.zarr").meta
    from nucli.tiling.tiler import run_tiling

    report = run_tiling(tmp_path / "img.png", tmp_path / "a.zarr", mpp="auto", method="watershed",
                        tissue_mask=False, progress=False)
    assert report.status == "complete" and report.summary()["auto_zoom"] == meta["auto_scale"]["zoom"]
    assert meta["source_mpp_from"] == "auto" and meta["source_mpp"] is None
    z = meta["auto_scale"]["zoom"]
    assert z > 1.5 and meta["downsample"] == 1 / z
    assert meta["working_size"] == [int(400 * z), int(300 * z)]
    # the same command resumes the same store (the probe is deterministic)
    again = tile_slide(tmp_path / "img.png", tmp_path / "a.zarr", mpp="auto", method="watershed",
                       tissue_mask=False, progress=False)
    assert again.meta["auto_scale"] == meta["auto_scale"]
    # with a pixel size, auto uses it and probes nothing
    store = tile_slide(tmp_path / "img.png", tmp_path / "b.zarr", mpp=0.25, method="watershed",
                       tissue_mask=False, progress=False)
    assert store.meta["auto_scale"] is None
    del ratios["watershed"]  # a method without a rule: native resolution, nothing probed
    store = tile_slide(tmp_path / "img.png", tmp_path / "d.zarr", mpp="auto", method="watershed",
                       tissue_mask=False, progress=False)
    assert store.meta["auto_scale"] is None and store.meta["downsample"] == 1.0
    bad = CliRunner().invoke(app, ["tile", str(tmp_path / "img.png"), "-o", str(tmp_path / "c.zarr"),
                                   "--mpp", "auto", "--mpp-target", "0.5"])
    assert bad.exit_code == 1 and "auto" in bad.output
    bad = CliRunner().invoke(app, ["tile", str(tmp_path / "img.png"), "-o", str(tmp_path / "c.zarr"), "--mpp", "x"])
    assert bad.exit_code == 1 and "--mpp" in bad.output


def test_segment_auto_end_to_end(tmp_path, ratios):
    img = discs((256, 256), radius=4, step=16)
    skimage.io.imsave(tmp_path / "img.png", img, check_contrast=False)
    res = CliRunner().invoke(app, ["segment", str(tmp_path / "img.png"), "-o", str(tmp_path / "n.geojson"),
                                   "--method", "watershed", "--mpp", "auto", "--no-tissue-mask", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["auto_zoom"] > 1.5
    feats = json.loads((tmp_path / "n.geojson").read_text())["features"]
    assert len(feats) == 256
    xs = [c[0] for f in feats for c in f["geometry"]["coordinates"][0]]
    assert max(xs) <= 256  # outlines are in the image's own pixels, not the enlarged ones
    from nucli.tiling.store import RunStore

    (store,) = tmp_path.glob("*.zarr")
    assert RunStore.open(store).meta["auto_scale"]["zoom"] > 1.5
