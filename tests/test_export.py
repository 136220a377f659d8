"""Exports: GeoJSON that QuPath imports as detections, measurements table, label image, overlay."""

from __future__ import annotations

import csv
import gzip
import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest

from nucli.errors import OutputExistsError, UsageError
from nucli.export import check_outputs, default_store_path, make_sinks, resolve_outputs
from nucli.export.geojson import check_qupath_feature, load, qupath_features
from nucli.export.measurements import columns
from nucli.pipeline import segment_store, store_from_array
from nucli.stitching import stitch_store
from test_stitching import CropMethod, encode, ellipse_image


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """A segmented store at downsample 2 (level-0 is twice the working size)."""
    d = tmp_path_factory.mktemp("seg")
    labels = ellipse_image(523, 411, 200, 48, n=400, seed=11)
    store = store_from_array(d / "run.zarr", encode(labels), tile_size=200, overlap=48, downsample=2.0,
                             source_mpp=0.25, level0_size=(1046, 822), fingerprint="slide-abc")
    segment_store(store, CropMethod(), progress=False)
    return store, labels


def export(store, tmp_path, *names, overlay=None):
    outs = {}
    for n in names:
        outs.update(resolve_outputs(tmp_path / n))
    stats = stitch_store(store, make_sinks(outs, overlay), progress=False)
    return outs, stats


# ----------------------------------------------------------------------------- QuPath's rules
def test_geojson_is_what_qupath_imports(segmented, tmp_path):
    store, labels = segmented
    outs, stats = export(store, tmp_path, "n.geojson")
    doc = json.loads(Path(outs["geojson"]).read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection"
    feats = qupath_features(doc)
    assert len(feats) == stats.nuclei == labels.max()
    for f in feats:
        assert check_qupath_feature(f, bounds=(1046, 822)) == []
    assert len({f["id"] for f in feats}) == len(feats)
    m = feats[0]["properties"]["measurements"]
    for name in ("Area µm^2", "Area px^2", "Centroid X µm", "Perimeter µm", "Circularity", "Solidity",
                 "Eccentricity", "Major axis µm", "Minor axis µm", "Orientation °", "Score"):
        assert "Nucleus: " + name in m
        assert name not in m  # QuPath's own names: hidden ("Duplicate measurement") or overwritten


def test_qupath_rule_checker_rejects_what_qupath_rejects():
    good = {"type": "Feature", "id": str(uuid.uuid4()),
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]},
            "properties": {"objectType": "detection", "classification": {"name": "Nucleus", "color": [1, 2, 3]},
                           "measurements": {"Nucleus: Area px^2": 8.0}}}
    assert check_qupath_feature(good) == []
    # a FeatureCollection, a bare array and a single Feature are all accepted
    assert qupath_features({"type": "FeatureCollection", "features": [good]}) == [good]
    assert qupath_features([good]) == [good]
    assert qupath_features(good) == [good]
    with pytest.raises(ValueError):
        qupath_features({"type": "Polygon"})

    def broken(**change):
        f = json.loads(json.dumps(good))
        for path, value in change.items():
            obj = f
            keys = path.split("__")
            for k in keys[:-1]:
                obj = obj[k]
            obj[keys[-1]] = value
        return check_qupath_feature(f, bounds=(10, 10))

    assert broken(id="nucleus-1")
    assert broken(properties__classification={"name": "Nucleus"})  # no color
    assert broken(properties__objectType="annotation")
    assert broken(geometry__coordinates=[[[0, 0], [4, 0], [4, 4], [0, 1]]])  # not closed
    assert broken(geometry__coordinates=[[[0, 0], [40, 0], [4, 4], [0, 0]]])  # outside the slide
    assert broken(geometry__coordinates=[[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]])  # bow-tie: invalid
    assert broken(properties__measurements={"Area": float("nan")})
    # a class without a colour, or one invalid polygon, makes QuPath refuse the whole file: never written
    assert broken(properties__classification={"name": "Positive"})
    # names QuPath computes itself would be hidden (centroids) or overwritten (Add shape features)
    assert broken(properties__measurements={"Centroid X µm": 1.0})
    assert broken(properties__measurements={"Area µm^2": 1.0})
    # QuPath rounds vertices to 0.01 px: a vertex off that grid would move on import
    assert broken(geometry__coordinates=[[[0, 0], [4.005, 0], [4, 4], [0, 0]]])
    # a cell needs its nucleus; a detection has none
    assert broken(properties__objectType="cell")
    cell = json.loads(json.dumps(good))
    cell["properties"]["objectType"] = "cell"
    cell["properties"]["nucleusGeometry"] = {"type": "Polygon", "coordinates": [[[1, 1], [2, 1], [2, 2], [1, 1]]]}
    assert check_qupath_feature(cell) == []
    cell["properties"]["nucleusGeometry"]["coordinates"] = [[[1, 1], [2, 2], [2, 1], [1, 2], [1, 1]]]
    assert check_qupath_feature(cell)  # bow-tie nucleus


def test_coordinates_are_level0(segmented, tmp_path):
    store, labels = segmented
    outs, _ = export(store, tmp_path, "n.geojson", "n.csv")
    feats = qupath_features(load(outs["geojson"]))
    rows = list(csv.DictReader(open(outs["csv"], encoding="utf-8")))
    assert [r["id"] for r in rows] == [f["id"] for f in feats]
    from shapely.geometry import shape

    for f, r in zip(feats[:200], rows[:200]):
        poly = shape(f["geometry"])
        # centroid of the nucleus pixels at working res (x, y) -> level-0 = x * 2
        cx, cy = float(r["centroid_x_px"]), float(r["centroid_y_px"])
        lab = labels[int(cy / 2), int(cx / 2)]
        ys, xs = np.nonzero(labels == lab)
        assert cx == pytest.approx((xs.mean() + 0.5) * 2, abs=1e-3)
        assert cy == pytest.approx((ys.mean() + 0.5) * 2, abs=1e-3)
        assert poly.centroid.distance(__import__("shapely").Point(cx, cy)) < 2.0
        assert float(r["area_px2"]) == pytest.approx(len(xs) * 4.0)
        assert float(r["area_um2"]) == pytest.approx(len(xs) * 0.25)  # 0.25 µm/px * 2 = 0.5 µm per working px
        assert float(r["centroid_x_um"]) == pytest.approx(cx * 0.25, abs=1e-3)


def test_same_input_gives_identical_bytes(segmented, tmp_path):
    store, _ = segmented
    a, _ = export(store, tmp_path / "a", "n.geojson.gz", "n.csv")
    b, _ = export(store, tmp_path / "b", "n.geojson.gz", "n.csv")
    assert Path(a["geojson.gz"]).read_bytes() == Path(b["geojson.gz"]).read_bytes()
    assert Path(a["csv"]).read_bytes() == Path(b["csv"]).read_bytes()
    with gzip.open(a["geojson.gz"], "rt", encoding="utf-8") as fh:
        assert json.load(fh)["type"] == "FeatureCollection"


def test_measurement_values(tmp_path):
    from skimage.draw import disk

    labels = np.zeros((200, 200), np.int32)
    labels[disk((100, 100), 15)] = 1
    store = store_from_array(tmp_path / "run.zarr", encode(labels), tile_size=200, overlap=40, source_mpp=0.5)
    segment_store(store, CropMethod(), progress=False)
    outs, _ = export(store, tmp_path, "n.csv")
    (row,) = list(csv.DictReader(open(outs["csv"], encoding="utf-8")))
    area = float(row["area_px2"])
    assert area == (labels > 0).sum()
    assert float(row["equivalent_diameter_px"]) == pytest.approx(30.0, rel=0.03)
    assert float(row["major_axis_px"]) == pytest.approx(float(row["minor_axis_px"]), rel=0.03)
    assert float(row["eccentricity"]) < 0.2
    assert 0.95 < float(row["solidity"]) <= 1.0
    assert 0.9 < float(row["circularity"]) <= 1.0
    assert float(row["perimeter_px"]) == pytest.approx(2 * math.pi * 15, rel=0.05)
    assert float(row["area_um2"]) == pytest.approx(area * 0.25)


def test_orientation_follows_the_major_axis(tmp_path):
    from skimage.draw import ellipse

    labels = np.zeros((200, 200), np.int32)
    # long axis along +x rotated by 30° towards +y (image down): skimage's rotation is the other way
    rr, cc = ellipse(100, 100, 8, 25, rotation=-np.deg2rad(30))
    labels[rr, cc] = 1
    store = store_from_array(tmp_path / "run.zarr", encode(labels), tile_size=200, overlap=64)
    segment_store(store, CropMethod(), progress=False)
    outs, _ = export(store, tmp_path, "n.csv")
    (row,) = list(csv.DictReader(open(outs["csv"], encoding="utf-8")))
    assert float(row["orientation_deg"]) == pytest.approx(30.0, abs=2.0)


def test_micrometre_columns_left_out_without_pixel_size(tmp_path):
    labels = ellipse_image(300, 300, 200, 48, n=30, seed=2)
    store = store_from_array(tmp_path / "run.zarr", encode(labels), tile_size=200, overlap=48)
    segment_store(store, CropMethod(), progress=False)
    outs, _ = export(store, tmp_path, "n.csv", "n.geojson")
    header = open(outs["csv"], encoding="utf-8").readline().strip().split(",")
    assert not [h for h in header if h.endswith("_um") or h.endswith("_um2")]
    assert "area_px2" in header
    f = qupath_features(load(outs["geojson"]))[0]
    assert not [k for k in f["properties"]["measurements"] if "µm" in k]


def test_columns_follow_modality_and_scores():
    keys = [c.key for c in columns(has_mpp=True, brightfield=True, has_scores=False)]
    assert "hematoxylin_mean" in keys and "score" not in keys
    keys = [c.key for c in columns(has_mpp=True, brightfield=False, has_scores=True)]
    assert "intensity_mean" in keys and "score" in keys


def test_label_image_zarr(segmented, tmp_path):
    import zarr

    store, labels = segmented
    outs, stats = export(store, tmp_path, "n.labels.zarr")
    arr = zarr.open_array(str(outs["labels"]), mode="r")
    assert arr.shape == labels.shape and arr.dtype == np.int32
    attrs = arr.attrs["nucli"]
    assert attrs["kind"] == "label-image" and attrs["downsample"] == 2.0 and attrs["working_mpp"] == 0.5
    img = np.asarray(arr[:])
    assert len(np.unique(img[img > 0])) == stats.nuclei


def test_overlay_png(segmented, tmp_path):
    from PIL import Image

    store, labels = segmented
    export(store, tmp_path, "n.geojson", overlay=tmp_path / "o.png")
    img = np.asarray(Image.open(tmp_path / "o.png"))
    assert img.shape == (411, 523, 3)
    green = (img[..., 0] == 0) & (img[..., 1] == 255) & (img[..., 2] == 0)
    # outlines sit on nucleus boundaries
    assert green.sum() > 1000
    from scipy import ndimage as ndi

    near = ndi.binary_dilation(labels > 0, iterations=2)
    assert near[green].mean() > 0.99


# ----------------------------------------------------------------------------- outputs and paths
def test_output_paths_from_suffix_and_format(tmp_path):
    outs = resolve_outputs(tmp_path / "cmu.geojson", ["csv", "labels"])
    assert {k: v.name for k, v in outs.items()} == {"geojson": "cmu.geojson", "csv": "cmu.csv",
                                                    "labels": "cmu.labels.zarr"}
    assert resolve_outputs(tmp_path / "cmu.geojson.gz")["geojson.gz"].name == "cmu.geojson.gz"
    assert resolve_outputs(tmp_path / "x", ["geojson"])["geojson"].name == "x.geojson"
    assert default_store_path(tmp_path / "cmu.geojson").name == "cmu.nucli.zarr"
    assert default_store_path(tmp_path / "cmu.geojson.gz").name == "cmu.nucli.zarr"
    with pytest.raises(UsageError, match="--format"):
        resolve_outputs(tmp_path / "cmu.txt")
    with pytest.raises(UsageError, match="unknown --format"):
        resolve_outputs(tmp_path / "cmu.geojson", ["shp"])


def test_existing_outputs_are_kept_without_overwrite(tmp_path):
    p = tmp_path / "cmu.geojson"
    p.write_text("keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_outputs([p], overwrite=False)
    # --overwrite replaces only nucli's own outputs: a file nucli did not write is refused
    with pytest.raises(OutputExistsError, match="refusing to replace .*nucli did not write"):
        check_outputs([p], overwrite=True)
    assert p.read_text() == "keep me"
    p.write_text('{"type": "FeatureCollection", "features": [\n]}\n')  # what nucli writes for no nuclei
    check_outputs([p], overwrite=True)


def test_failed_export_leaves_nothing_behind(tmp_path):
    from nucli.errors import ProcessingError

    labels = np.zeros((300, 500), np.int32)
    from skimage.draw import ellipse

    rr, cc = ellipse(150, 222, 20, 40)  # wider than the overlap, across the seam
    labels[rr, cc] = 1
    labels[10:20, 10:20] = 2
    store = store_from_array(tmp_path / "run.zarr", encode(labels), tile_size=256, overlap=32)
    segment_store(store, CropMethod(), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    outs = resolve_outputs(out / "n.geojson", ["csv", "labels"])
    with pytest.raises(ProcessingError):
        stitch_store(store, make_sinks(outs, out / "o.png"), progress=False)
    assert list(out.iterdir()) == []


def test_overlay_shows_the_washed_out_slide_where_nothing_was_tiled(tmp_path):
    """Untiled areas show the slide (lightened), or grey when the slide file is gone or changed."""
    from PIL import Image

    from nucli.export.overlay import NOT_TILED_RGB, WASH, OverlaySink
    from nucli.slide import open_slide
    from nucli.stitching import Frame

    rgb = np.zeros((120, 160, 3), np.uint8)
    rgb[:, :80] = (180, 40, 40)
    rgb[:, 80:] = (40, 40, 180)
    src = tmp_path / "slide.png"
    Image.fromarray(rgb).save(src)
    with open_slide(src) as s:
        fp = s.fingerprint
    frame = Frame(level0_size=(160, 120), working_size=(160, 120), downsample=1.0, um_per_px=None,
                  source_mpp=None, fingerprint=fp, brightfield=True, has_scores=False, tile_size=64,
                  overlap=8, source_path=str(src))
    sink = OverlaySink(tmp_path / "o.png")
    sink.open(frame)
    sink.close()
    out = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(int)
    assert out.shape == (120, 160, 3)
    washed = np.round(np.array([180, 40, 40]) * (1 - WASH) + 255 * WASH)
    assert np.abs(out[60, 20] - washed).max() <= 2 and out[60, 140, 2] > out[60, 140, 0] + 50
    # the slide file changed since the run: grey, as before
    Image.fromarray(rgb[:, ::-1].copy()).save(src)
    sink = OverlaySink(tmp_path / "o2.png")
    sink.open(frame)
    sink.close()
    assert (np.asarray(Image.open(tmp_path / "o2.png").convert("RGB")) == NOT_TILED_RGB).all()
