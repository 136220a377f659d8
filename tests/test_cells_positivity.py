"""QuPath-native results: cells grown from nuclei, DAB positivity classes, measurement names and the
0.01 px vertex grid; GeoJSON values equal to the CSV's."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import shape
from typer.testing import CliRunner

from nucli.cli import app
from nucli.errors import UsageError
from nucli.export import make_sinks, resolve_outputs
from nucli.export.cells import check_store, object_options, pixel_outline
from nucli.export.geojson import QUPATH_OWN_NAMES, check_qupath_feature, load, qupath_features
from nucli.export.measurements import columns
from nucli.export.positivity import CLASS_COLORS, Positivity, dab_od, parse_positivity, stain_problem
from nucli.export.qupath_grid import on_grid
from nucli.models.registry import build_method
from nucli.pipeline import segment_store, store_from_array
from nucli.stitching import stitch_store
from test_stitching import CropMethod, encode, ellipse_image

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------- synthetic IHC
def _stain_vectors():
    from skimage.color import rgb_from_hed

    return rgb_from_hed[0], rgb_from_hed[1], rgb_from_hed[2]


def ihc_image(nuclei, size=(320, 320), cytoplasm_h=0.15, eosin=0.0):
    """RGB by Beer-Lambert from known stain ODs: ``nuclei`` = [(cy, cx, r, hematoxylin OD, DAB OD)]."""
    from skimage.draw import disk

    h_vec, e_vec, d_vec = _stain_vectors()
    H = np.full(size, cytoplasm_h, np.float64)
    E = np.full(size, eosin, np.float64)
    D = np.zeros(size, np.float64)
    for cy, cx, r, ch, cd in nuclei:
        rr, cc = disk((cy, cx), r, shape=size)
        H[rr, cc] = ch
        D[rr, cc] = cd
    od = H[..., None] * h_vec + E[..., None] * e_vec + D[..., None] * d_vec
    return np.clip(np.round(255.0 * 10.0 ** (-od)), 0, 255).astype(np.uint8)


KNOWN_DAB = [0.05, 0.15, 0.3, 0.45, 0.55, 0.8]
KNOWN = [(60 + 100 * (k // 3), 60 + 100 * (k % 3), 14, 0.7, d) for k, d in enumerate(KNOWN_DAB)]


def test_dab_od_recovers_known_stain_densities():
    img = ihc_image([(40, 40, 20, 0.6, 0.35), (40, 120, 20, 0.3, 0.0), (120, 40, 20, 0.0, 0.7)], size=(160, 160))
    dab = dab_od(img)
    assert dab[40, 40] == pytest.approx(0.35, abs=0.02)
    assert dab[40, 120] == pytest.approx(0.0, abs=0.02)  # hematoxylin alone reads as no DAB
    assert dab[120, 40] == pytest.approx(0.7, abs=0.03)


def test_classes_follow_qupath_thresholds():
    p = Positivity()
    assert p.thresholds == (0.2,)
    assert [p.classify(v) for v in (0.1, 0.2, 0.5)] == ["Negative", "Positive", "Positive"]  # >= like QuPath
    q = parse_positivity("dab", "0.2,0.4,0.6")
    assert [q.classify(v) for v in (0.1, 0.3, 0.5, 0.6, 0.9)] == ["Negative", "1+", "2+", "3+", "3+"]
    s = q.summary({"Negative": 2, "1+": 1, "2+": 1, "3+": 0})
    assert s["positive"] == 2 and s["positive_percent"] == 50.0 and s["h_score"] == 75.0
    assert CLASS_COLORS["Positive"] == (200, 50, 50) and CLASS_COLORS["Negative"] == (90, 90, 180)


@pytest.mark.parametrize("bad", ["abc", "0.4,0.2,0.6", "0.2,0.4", "-0.1", "0,0.2,0.4"])
def test_bad_thresholds_are_one_line_errors(bad):
    with pytest.raises(UsageError):
        parse_positivity("dab", bad)


def test_option_combinations_are_checked():
    with pytest.raises(UsageError, match="--positivity dab"):
        object_options(positivity_threshold="0.3")
    with pytest.raises(UsageError, match="--objects cells"):
        object_options(cell_expansion=3.0)
    with pytest.raises(UsageError, match="µm"):
        object_options("cells", -1.0)
    o = object_options("cells")
    assert o.cells and o.expansion_um == 5.0 and o.positivity is None


def _positivity_store(tmp_path, tile_size=512):
    store = store_from_array(tmp_path / "run.zarr", ihc_image(KNOWN), tile_size=tile_size, overlap=48,
                             source_mpp=0.5)
    segment_store(store, build_method("watershed"), progress=False)
    return store


@pytest.mark.parametrize("objects", ["detections", "cells"])
def test_positivity_on_synthetic_nuclei_with_known_dab(tmp_path, objects):
    store = _positivity_store(tmp_path)
    opts = object_options(objects, None, "dab", "0.2,0.4,0.6")
    check_store(store, opts)
    outs = resolve_outputs(tmp_path / "n.geojson", ["csv"])
    sinks = make_sinks(outs, None, opts)
    stats = stitch_store(store, sinks, progress=False)
    assert stats.nuclei == len(KNOWN)
    rows = list(csv.DictReader(open(outs["csv"], encoding="utf-8")))
    want = {0.05: "Negative", 0.15: "Negative", 0.3: "1+", 0.45: "2+", 0.55: "2+", 0.8: "3+"}
    for r in rows:
        cx, cy = float(r["centroid_x_px"]), float(r["centroid_y_px"])
        cy0, cx0, _, _, dab = min(KNOWN, key=lambda k: (k[0] - cy) ** 2 + (k[1] - cx) ** 2)
        assert float(r["dab_mean"]) == pytest.approx(dab, abs=0.03)
        assert r["class"] == want[dab]
    summary = sinks[0].summary()
    assert summary["negative"] == 2 and summary["1+"] == 1 and summary["2+"] == 2 and summary["3+"] == 1
    assert summary["positive_percent"] == pytest.approx(100 * 4 / 6, abs=0.01)
    feats = qupath_features(load(outs["geojson"]))
    for f in feats:
        assert check_qupath_feature(f) == []
        cls = f["properties"]["classification"]
        assert cls["color"] == list(CLASS_COLORS[cls["name"]])
        assert f["properties"]["objectType"] == ("cell" if objects == "cells" else "detection")
        assert "Nucleus: DAB OD mean" in f["properties"]["measurements"]
    if objects == "cells":  # the synthetic cytoplasm has no DAB
        assert all(float(r["cytoplasm_dab_mean"]) < 0.03 for r in rows)
        assert all(float(r["cell_area_px2"]) > float(r["area_px2"]) for r in rows)


def test_dab_positivity_refused_on_he_and_fluorescence(tmp_path):
    he = ihc_image([(80, 80, 14, 0.7, 0.0)], size=(200, 200), cytoplasm_h=0.05, eosin=0.35)
    assert "H&E" in stain_problem([he], True)
    assert stain_problem([ihc_image(KNOWN)], True) is None
    assert "fluorescence" in stain_problem([he], False)
    store = store_from_array(tmp_path / "he.zarr", he, tile_size=200, overlap=48, source_mpp=0.5)
    with pytest.raises(UsageError, match="H&E"):
        check_store(store, object_options(None, None, "dab"))


def test_cli_refuses_dab_on_he_in_one_line(tmp_path):
    from PIL import Image

    he = ihc_image([(80, 80, 14, 0.7, 0.0), (150, 60, 12, 0.8, 0.0)], size=(240, 240), cytoplasm_h=0.05,
                   eosin=0.35)
    Image.fromarray(he).save(tmp_path / "he.png")
    r = invoke("segment", tmp_path / "he.png", "--method", "watershed", "--mpp", "0.5", "-o",
               tmp_path / "he.geojson", "--positivity", "dab")
    assert r.exit_code != 0
    assert "H&E" in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 2
    assert not (tmp_path / "he.geojson").exists()
    r = invoke("segment", tmp_path / "he.png", "--method", "watershed", "-o", tmp_path / "c.geojson",
               "--objects", "cells")
    assert r.exit_code != 0 and "pixel size" in r.output and "Traceback" not in r.output


# ----------------------------------------------------------------------------- cells, synthetic
def _cell_export(tmp_path, tile, overlap, name, expansion=5.0, labels=None):
    labels = ellipse_image(523, 411, 200, 48, n=400, seed=11) if labels is None else labels
    store = store_from_array(tmp_path / f"{name}.zarr", encode(labels), tile_size=tile, overlap=overlap,
                             source_mpp=0.5)
    segment_store(store, CropMethod(), progress=False)
    outs = resolve_outputs(tmp_path / f"{name}.geojson", ["csv"])
    sinks = make_sinks(outs, None, object_options("cells", expansion))
    stitch_store(store, sinks, progress=False)
    return qupath_features(load(outs["geojson"])), list(csv.DictReader(open(outs["csv"], encoding="utf-8")))


def _key(f):
    return shapely.to_wkb(shapely.normalize(shape(f["properties"]["nucleusGeometry"])))


def test_cells_are_seam_exact(tmp_path):
    tiled, rows_t = _cell_export(tmp_path, 200, 48, "tiled")
    whole, rows_w = _cell_export(tmp_path, 600, 48, "whole")  # one tile holds the whole image
    assert len(tiled) == len(whole) > 300
    a = {_key(f): f for f in tiled}
    b = {_key(f): f for f in whole}
    assert a.keys() == b.keys()
    for k, f in a.items():
        g = b[k]
        assert shapely.equals_exact(shapely.normalize(shape(f["geometry"])),
                                    shapely.normalize(shape(g["geometry"])), 0.0)
        ma, mb = f["properties"]["measurements"], g["properties"]["measurements"]
        for name in ("Cell: Area px^2", "Cell: Perimeter µm", "Nucleus/Cell area ratio", "Cell: Intensity mean"):
            assert ma[name] == mb[name]


def test_cells_never_overlap_and_hold_their_nucleus(tmp_path):
    feats, rows = _cell_export(tmp_path, 200, 48, "c")
    cells = [shape(f["geometry"]) for f in feats]
    nuclei = [shape(f["properties"]["nucleusGeometry"]) for f in feats]
    tree = shapely.STRtree(cells)
    a, b = tree.query(cells, predicate="intersects")
    pairs = [(i, j) for i, j in zip(a, b) if i < j]
    assert pairs, "neighbouring cells should touch in this dense image"
    assert all(cells[i].intersection(cells[j]).area == 0 for i, j in pairs)
    assert all(c.covers(n) for c, n in zip(cells, nuclei))
    assert all(c.area >= n.area for c, n in zip(cells, nuclei))
    # grown by 5 µm = 10 px at 0.5 µm/px: no cell pixel is farther than that from its nucleus
    assert all(c.buffer(-0.01).difference(n.buffer(10.75)).area == 0 for c, n in zip(cells, nuclei))


def _pair_labels():
    """Two nuclei 20 px apart on one row."""
    labels = np.zeros((60, 90), np.int32)
    labels[25:35, 20:30] = 1
    labels[25:35, 50:60] = 2
    return labels


def test_two_cells_meet_halfway(tmp_path):
    labels = _pair_labels()
    feats, _ = _cell_export(tmp_path, 200, 48, "pair", expansion=8.0, labels=labels)
    cells = sorted((shape(f["geometry"]) for f in feats), key=lambda c: c.bounds[0])
    assert len(cells) == 2
    # gap of 20 px between x=30 and x=50: each cell takes 10 px of it (pixel edges at x = 40)
    assert cells[0].bounds[2] == 40.0 and cells[1].bounds[0] == 40.0
    assert cells[0].intersection(cells[1]).area == 0
    assert cells[0].bounds[0] == 20 - 16  # 8 µm = 16 px where nothing competes


def test_pixel_outline_follows_pixel_edges():
    m = np.zeros((6, 7), bool)
    m[1:5, 1:6] = True
    m[2:4, 3] = False  # a hole
    poly = pixel_outline(m, 10, 20)
    assert poly.area == m.sum() and len(poly.interiors) == 1
    assert poly.bounds == (11.0, 21.0, 16.0, 25.0)


# ----------------------------------------------------------------------------- CLI, GeoJSON == CSV
IHC_SIZE = (400, 480)  # (height, width)


@pytest.fixture(scope="module")
def ihc_slide(tmp_path_factory):
    """A synthetic IHC picture (PNG, given --mpp 0.5): 48 nuclei with DAB from none to strong, some touching."""
    from PIL import Image

    rng = np.random.default_rng(7)
    nuclei = []
    for k in range(48):
        cy, cx = 40 + 52 * (k // 8), 35 + 58 * (k % 8) + (14 if k % 5 == 0 else 0)
        nuclei.append((cy, cx, int(rng.integers(9, 14)), 0.7, float(rng.uniform(0.0, 0.8))))
    d = tmp_path_factory.mktemp("ihc")
    Image.fromarray(ihc_image(nuclei, size=IHC_SIZE)).save(d / "ihc.png")
    return d / "ihc.png"


def _csv_value(text):
    return float(text) if text != "" else None


@pytest.mark.parametrize("objects,positivity,mpp_target", [
    ("detections", False, None), ("detections", True, None), ("cells", False, None), ("cells", True, None),
    ("detections", False, 0.7), ("detections", True, 0.7), ("cells", False, 0.7), ("cells", True, 0.7),
])
def test_geojson_follows_qupath_and_equals_csv(tmp_path, ihc_slide, objects, positivity, mpp_target):
    args = ["segment", ihc_slide, "--method", "watershed", "--mpp", "0.5", "-o", tmp_path / "n.geojson", "-f", "csv",
            "--objects", objects, "--json"]
    if positivity:
        args += ["--positivity", "dab"]
    if mpp_target:
        args += ["--mpp-target", mpp_target]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    feats = qupath_features(load(tmp_path / "n.geojson"))
    rows = {row["id"]: row for row in csv.DictReader(open(tmp_path / "n.csv", encoding="utf-8"))}
    assert len(feats) == len(rows) == summary["nuclei"] > 30
    cols = columns(has_mpp=True, brightfield=True, has_scores=False, cells=objects == "cells", dab=positivity,
                   classified=positivity)
    names = [c.qupath for c in cols if c.qupath]
    assert len(set(names)) == len(names) and not QUPATH_OWN_NAMES & set(names)
    for f in feats:
        assert check_qupath_feature(f, bounds=(IHC_SIZE[1], IHC_SIZE[0])) == []
        props = f["properties"]
        assert props["objectType"] == ("cell" if objects == "cells" else "detection")
        assert ("nucleusGeometry" in props) == (objects == "cells")
        for ring in f["geometry"]["coordinates"]:
            assert on_grid([v for pt in ring for v in pt])
        row = rows[f["id"]]
        meas = props["measurements"]
        for c in cols:  # every measurement is the CSV's value, and every CSV value is in the GeoJSON
            if c.qupath is None:
                continue
            v = _csv_value(row[c.key])
            assert meas.get(c.qupath) == v, (c.key, c.qupath)
        # polygon measurements are of the polygon as written (what QuPath holds)
        nuc = shape(props.get("nucleusGeometry") or f["geometry"])
        assert meas["Nucleus: Perimeter px"] == round(nuc.length, 4)
        assert meas["Nucleus: Circularity"] == round(4 * math.pi * nuc.area / nuc.length ** 2, 4)
        if objects == "cells":
            cell = shape(f["geometry"])
            assert meas["Cell: Area px^2"] == round(cell.area, 4)
            assert meas["Cell: Area px^2"] >= nuc.area
        if positivity:
            assert props["classification"]["name"] in ("Positive", "Negative")
            assert row["class"] == props["classification"]["name"]
        else:
            assert props["classification"]["name"] == ("Cell" if objects == "cells" else "Nucleus")
    if positivity:
        n_pos = sum(f["properties"]["classification"]["name"] == "Positive" for f in feats)
        assert summary["positive"] == n_pos and summary["negative"] == len(feats) - n_pos
        assert summary["positive_percent"] == round(100 * n_pos / len(feats), 2)


# ----------------------------------------------------------------------------- the real slide
@pytest.mark.data
@pytest.mark.slow
def test_cmu_cells_never_overlap(cmu_slide, tmp_path):
    r = invoke("segment", cmu_slide, "--method", "watershed", "-o", tmp_path / "cmu.geojson", "-f", "csv",
               "--objects", "cells", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    feats = qupath_features(load(tmp_path / "cmu.geojson"))
    assert summary["cells"] == len(feats) == summary["nuclei"] > 1000
    assert all(check_qupath_feature(f, bounds=(2220, 2967)) == [] for f in feats)
    cells = [shape(f["geometry"]) for f in feats]
    nuclei = [shape(f["properties"]["nucleusGeometry"]) for f in feats]
    a, b = shapely.STRtree(cells).query(cells, predicate="overlaps")
    assert not (a != b).any(), "two cells overlap"
    a, b = shapely.STRtree(cells).query(cells, predicate="contains")
    assert not (a != b).any(), "a cell contains another"
    # a nucleus lies inside its cell unless two nuclei overlap each other (kept by the stitcher below 50 %)
    a, b = shapely.STRtree(nuclei).query(nuclei, predicate="overlaps")
    overlapping = set(a[a != b].tolist())
    outside = {k for k, (c, n) in enumerate(zip(cells, nuclei)) if not c.covers(n)}
    assert outside <= overlapping and len(outside) <= 0.005 * len(feats)
    assert all(c.area >= n.area for c, n in zip(cells, nuclei))


def test_rerun_with_overwrite_replaces_cell_outputs(tmp_path, ihc_slide):
    args = ["segment", ihc_slide, "--method", "watershed", "--mpp", "0.5", "-o", tmp_path / "n.geojson", "-f",
            "csv", "--objects", "cells", "--positivity", "dab", "--quiet"]
    assert invoke(*args).exit_code == 0
    first = (tmp_path / "n.csv").read_bytes()
    r = invoke(*args)
    assert r.exit_code != 0 and "--overwrite" in r.output
    r = invoke(*args, "--overwrite")  # nucli recognises its own cell tables and GeoJSON
    assert r.exit_code == 0, r.output
    assert (tmp_path / "n.csv").read_bytes() == first


def test_stitch_command_writes_cells_and_an_overlay_coloured_by_class(tmp_path, ihc_slide):
    from PIL import Image

    from nucli.export.overlay import CELL_RGB

    r = invoke("segment", ihc_slide, "--method", "watershed", "--mpp", "0.5", "-o", tmp_path / "n.geojson",
               "--quiet")
    assert r.exit_code == 0, r.output
    r = invoke("stitch", tmp_path / "n.nucli.zarr", "-o", tmp_path / "c.geojson", "--objects", "cells",
               "--positivity", "dab", "--positivity-threshold", "0.2,0.4,0.6", "--overlay", tmp_path / "c.png",
               "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    feats = qupath_features(load(tmp_path / "c.geojson"))
    assert summary["cells"] == len(feats) and summary["objects"] == "cells"
    names = [f["properties"]["classification"]["name"] for f in feats]
    assert names.count("Negative") == summary["negative"]
    assert all(names.count(k) == summary[k] for k in ("1+", "2+", "3+"))
    assert len(set(names)) >= 3  # the synthetic DAB spans several classes
    assert summary["h_score"] == round(100 * sum({"1+": 1, "2+": 2, "3+": 3}.get(n, 0) for n in names) / len(names),
                                       1)
    img = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    for color in [CELL_RGB] + [CLASS_COLORS[n] for n in set(names)]:
        assert (img == np.array(color, np.uint8)).all(axis=2).any(), color
    # bad combinations are one-line usage errors
    r = invoke("stitch", tmp_path / "n.nucli.zarr", "-o", tmp_path / "d.geojson", "--cell-expansion", "3")
    assert r.exit_code != 0 and "--objects cells" in r.output and "Traceback" not in r.output
    r = invoke("stitch", tmp_path / "n.nucli.zarr", "-o", tmp_path / "d.geojson", "--positivity", "dab",
               "--positivity-threshold", "0.5,0.2,0.9")
    assert r.exit_code != 0 and "increase" in r.output and "Traceback" not in r.output
