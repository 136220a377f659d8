"""`nucli evaluate`: every input format, folder pairing, data-set mode, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from nucli.cli import app
from nucli.metrics import METRICS, score_image

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def gt_image(shape=(40, 48)) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint16)
    lab[2:10, 2:10] = 3
    lab[2:10, 10:14] = 8  # touches nucleus 3
    lab[20:30, 5:12] = 12
    lab[24:36, 30:44] = 40
    return lab


def pred_image(shape=(40, 48)) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.int32)
    lab[2:10, 3:14] = 1  # merge of 3 and 8, shifted
    lab[21:30, 5:12] = 2
    lab[24:36, 30:37] = 5  # split of 40
    lab[24:36, 37:44] = 6
    lab[0:3, 40:46] = 7  # false positive
    return lab


def run_json(*args) -> dict:
    res = invoke(*args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def assert_matches(report_metrics: dict, true: np.ndarray, pred: np.ndarray) -> None:
    expected = score_image(true, pred).metrics()
    for m in METRICS:
        assert report_metrics[m] == pytest.approx(expected[m], abs=1e-12), m


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["tif", "png", "npy"])
def test_single_files_each_format(tmp_path, fmt):
    gt, pred = gt_image(), pred_image()
    gpath, ppath = tmp_path / f"gt.{fmt}", tmp_path / f"pred.{fmt}"
    if fmt == "tif":
        tifffile.imwrite(gpath, gt)
        tifffile.imwrite(ppath, pred)
    elif fmt == "png":
        import imageio.v3 as iio

        iio.imwrite(gpath, gt)
        iio.imwrite(ppath, pred.astype(np.uint16))
    else:
        np.save(gpath, gt)
        np.save(ppath, pred)
    data = run_json("evaluate", ppath, gpath)
    assert data["aggregate"]["n_images"] == 1
    assert_matches(data["aggregate"]["mean_over_images"], gt, pred)
    assert data["images"][0]["n_true"] == 4 and data["images"][0]["n_pred"] == 5
    # Not every metric is 1 on this pair: the comparison is meaningful.
    assert data["images"][0]["aji"] < 0.9


def test_identical_inputs_score_one_and_table_printed(tmp_path):
    gt = gt_image()
    tifffile.imwrite(tmp_path / "a.tif", gt)
    np.save(tmp_path / "b.npy", gt.astype(np.int64) * 7)  # other ids, other format
    res = invoke("evaluate", tmp_path / "b.npy", tmp_path / "a.tif")
    assert res.exit_code == 0, res.output
    assert "mean over images" in res.output and "pooled over nuclei" in res.output
    assert "AJI+" in res.output and "1.0000" in res.output


def test_folders_matched_by_stem_with_outputs(tmp_path):
    gdir, pdir = tmp_path / "gt", tmp_path / "pred"
    gdir.mkdir()
    pdir.mkdir()
    gts = {"img_a": gt_image(), "img_b": gt_image()[::-1].copy(), "img_c": np.zeros((40, 48), np.uint16)}
    preds = {"img_a": pred_image(), "img_b": gt_image()[::-1].copy(), "img_c": np.zeros((40, 48), np.int32)}
    for name, lab in gts.items():
        tifffile.imwrite(gdir / f"{name}.tif", lab)
    np.save(pdir / "img_a.npy", preds["img_a"])
    tifffile.imwrite(pdir / "img_b.tiff", preds["img_b"])
    tifffile.imwrite(pdir / "img_c.tif", preds["img_c"])
    (pdir / "notes.txt").write_text("not a label image")  # ignored
    out_json, out_csv = tmp_path / "scores.json", tmp_path / "scores.csv"
    res = invoke("evaluate", pdir, gdir, "--per-image", "-o", out_json, "--csv", out_csv)
    assert res.exit_code == 0, res.output
    assert "img_a" in res.output and "img_c" in res.output  # per-image rows
    data = json.loads(out_json.read_text())
    names = [r["image"] for r in data["images"]]
    assert names == ["img_a", "img_b", "img_c"]
    by_name = {r["image"]: r for r in data["images"]}
    assert_matches(by_name["img_a"], gts["img_a"], preds["img_a"])
    assert by_name["img_b"]["pq"] == 1.0 and by_name["img_c"]["aji"] == 1.0  # empty vs empty -> 1
    mean = data["aggregate"]["mean_over_images"]
    assert mean["aji"] == pytest.approx((by_name["img_a"]["aji"] + 1 + 1) / 3)
    # Pooled: counts summed over the images.
    from nucli.metrics import pooled_metrics

    pooled = pooled_metrics([score_image(gts[n], preds[n]) for n in gts])
    assert data["aggregate"]["pooled_over_nuclei"] == pytest.approx(pooled)
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["image"] for r in rows] == names
    assert float(rows[0]["aji"]) == pytest.approx(by_name["img_a"]["aji"], abs=1e-6)
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left
    # Existing outputs are not overwritten without --overwrite.
    res = invoke("evaluate", pdir, gdir, "-o", out_json)
    assert res.exit_code == 2 and "--overwrite" in flat(res.output)
    res = invoke("evaluate", pdir, gdir, "-o", out_json, "--overwrite", "--quiet")
    assert res.exit_code == 0 and res.output.strip() == ""


def test_zarr_array_and_group_with_downsample(tmp_path):
    import zarr

    gt = gt_image((40, 48))
    tifffile.imwrite(tmp_path / "gt.tif", gt)
    arr = zarr.create_array(str(tmp_path / "plain.zarr"), shape=gt.shape, dtype="int32", chunks=(16, 16))
    arr[:] = pred_image()
    data = run_json("evaluate", tmp_path / "plain.zarr", tmp_path / "gt.tif")
    assert_matches(data["images"][0], gt, pred_image())

    # A label image at half resolution, as `nucli stitch` exports it.
    coarse = np.zeros((20, 24), np.int32)
    coarse[1:5, 1:7] = 9
    coarse[12:18, 15:22] = 4
    g = zarr.open_group(str(tmp_path / "half.zarr"), mode="w")
    g.attrs["nucli"] = {"kind": "label-image", "downsample": 2.0}
    g.create_array("labels", shape=coarse.shape, dtype="int32", chunks=(8, 8))[:] = coarse
    full = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)
    tifffile.imwrite(tmp_path / "gt_full.tif", full.astype(np.uint16))
    data = run_json("evaluate", tmp_path / "half.zarr", tmp_path / "gt_full.tif")
    assert all(data["images"][0][m] == 1.0 for m in METRICS)
    # The same coarse labels without the downsample attribute: a size mismatch naming the file.
    g.attrs["nucli"] = {"kind": "label-image", "downsample": 1.0}
    res = invoke("evaluate", tmp_path / "half.zarr", tmp_path / "gt_full.tif")
    assert res.exit_code == 2 and "half.zarr" in flat(res.output) and "differs" in flat(res.output)


def test_zarr_run_store_with_tiles_is_explained(tmp_path):
    import zarr

    g = zarr.open_group(str(tmp_path / "run.zarr"), mode="w")
    g.attrs["nucli"] = {"format_version": 1, "tile_size": 8, "n_tiles": 2}
    g.create_array("labels", shape=(2, 8, 8), dtype="int32", chunks=(1, 8, 8))
    tifffile.imwrite(tmp_path / "gt.tif", np.zeros((16, 8), np.uint16))
    res = invoke("evaluate", tmp_path / "run.zarr", tmp_path / "gt.tif")
    assert res.exit_code == 2 and "nucli stitch" in flat(res.output)


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_geojson_polygons_multipolygons_and_holes(tmp_path):
    gt = np.zeros((30, 40), np.uint16)
    gt[2:8, 3:9] = 1  # plain square: x 3..9, y 2..8
    gt[10:20, 10:20] = 2
    gt[13:16, 12:15] = 0  # hole: x 12..15, y 13..16
    gt[22:25, 2:5] = 3  # two parts of one nucleus
    gt[22:25, 30:33] = 3
    tifffile.imwrite(tmp_path / "gt.tif", gt)
    features = [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [_square(3, 2, 9, 8)]}},
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [_square(10, 10, 20, 20), _square(12, 13, 15, 16)]},
        },
        {
            "type": "Feature",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [[_square(2, 22, 5, 25)], [_square(30, 22, 33, 25)]],
            },
        },
    ]
    (tmp_path / "pred.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    data = run_json("evaluate", tmp_path / "pred.geojson", tmp_path / "gt.tif")
    assert data["images"][0]["n_pred"] == 3
    assert all(data["images"][0][m] == 1.0 for m in METRICS)
    # A bare array of Features, shifted one pixel: exact IoU of the first square 30/42.
    features[0]["geometry"]["coordinates"] = [_square(4, 2, 10, 8)]
    (tmp_path / "shift.json").write_text(json.dumps(features))
    data = run_json("evaluate", tmp_path / "shift.json", tmp_path / "gt.tif")
    shifted = gt.copy()
    shifted[2:8, 3:9] = 0
    shifted[2:8, 4:10] = 1
    assert_matches(data["images"][0], gt, shifted)
    # GeoJSON ground truth against a label-image prediction uses the prediction's grid.
    data = run_json("evaluate", tmp_path / "gt.tif", tmp_path / "pred.geojson")
    assert data["images"][0]["pq"] == 1.0


# --------------------------------------------------------------------------- bad input


def test_size_mismatch_names_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "gt.tif", gt_image((40, 48)))
    tifffile.imwrite(tmp_path / "pred.tif", np.zeros((40, 47), np.uint16))
    res = invoke("evaluate", tmp_path / "pred.tif", tmp_path / "gt.tif")
    assert res.exit_code == 2
    msg = flat(res.output)
    assert "pred.tif" in msg and "47x40" in msg and "48x40" in msg
    assert "Traceback" not in res.output


def test_missing_ground_truth_is_listed_unless_allowed(tmp_path):
    gdir, pdir = tmp_path / "gt", tmp_path / "pred"
    gdir.mkdir()
    pdir.mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(gdir / f"{name}.tif", gt_image())
    for name in ("a", "b", "extra1", "extra2"):
        tifffile.imwrite(pdir / f"{name}.tif", gt_image())
    res = invoke("evaluate", pdir, gdir)
    assert res.exit_code == 2
    msg = flat(res.output)
    assert "extra1" in msg and "extra2" in msg and "--allow-missing" in msg
    data = run_json("evaluate", pdir, gdir, "--allow-missing")
    assert data["aggregate"]["n_images"] == 2 and data["skipped"] == ["extra1", "extra2"]
    # Missing predictions for ground-truth images are an error too.
    res = invoke("evaluate", gdir, pdir)
    assert res.exit_code == 2 and "no prediction" in flat(res.output)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((8, 8), 0.5, np.float32), "non-integer"),
        (np.ones((8, 8), bool), "binary mask"),
        (np.zeros((8, 8, 3), np.uint8), "2-D"),
        (-np.ones((8, 8), np.int16), "negative"),
    ],
)
def test_unusable_label_images(tmp_path, array, message):
    np.save(tmp_path / "pred.npy", array)
    np.save(tmp_path / "gt.npy", np.zeros((8, 8), np.uint16))
    res = invoke("evaluate", tmp_path / "pred.npy", tmp_path / "gt.npy")
    assert res.exit_code == 2 and message in flat(res.output) and "pred.npy" in flat(res.output)


def test_integral_float_labels_are_accepted(tmp_path):
    np.save(tmp_path / "pred.npy", gt_image().astype(np.float32))
    tifffile.imwrite(tmp_path / "gt.tif", gt_image())
    assert run_json("evaluate", tmp_path / "pred.npy", tmp_path / "gt.tif")["images"][0]["aji"] == 1.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"type": "FeatureCollection"}', "no 'features' list"),
        ('{"type": "Topology"}', "expected a GeoJSON FeatureCollection"),
        ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}]', "Point"),
        ('[{"type": "Feature", "geometry": null}]', "no geometry"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}]', "at least 3"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[["a", 0], [1, 1], [2, 0]]]}}]',
         "number pairs"),
        ('[1, 2]', "not a GeoJSON Feature"),
    ],
)
def test_malformed_geojson(tmp_path, text, message):
    (tmp_path / "pred.geojson").write_text(text)
    tifffile.imwrite(tmp_path / "gt.tif", gt_image())
    res = invoke("evaluate", tmp_path / "pred.geojson", tmp_path / "gt.tif")
    assert res.exit_code == 2, res.output
    assert message in flat(res.output) and "pred.geojson" in flat(res.output)


def test_nonexistent_and_unsupported_paths(tmp_path):
    tifffile.imwrite(tmp_path / "gt.tif", gt_image())
    res = invoke("evaluate", tmp_path / "nope.tif", tmp_path / "gt.tif")
    assert res.exit_code == 2 and "does not exist" in flat(res.output)
    (tmp_path / "pred.bmp").write_bytes(b"x")
    res = invoke("evaluate", tmp_path / "pred.bmp", tmp_path / "gt.tif")
    assert res.exit_code == 2 and "unsupported file type" in flat(res.output)
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    res = invoke("evaluate", tmp_path / "broken.tif", tmp_path / "gt.tif")
    assert res.exit_code == 2 and "cannot read" in flat(res.output)
    res = invoke("evaluate", tmp_path, tmp_path / "gt.tif")
    assert res.exit_code == 1 and "both be folders" in flat(res.output)


def test_conflicting_options(tmp_path):
    tifffile.imwrite(tmp_path / "gt.tif", gt_image())
    res = invoke("evaluate", tmp_path / "gt.tif")
    assert res.exit_code == 1 and "PRED and GT" in flat(res.output)
    res = invoke("evaluate", tmp_path / "gt.tif", tmp_path / "gt.tif", "--dataset", tmp_path)
    assert res.exit_code == 1 and "not both" in flat(res.output)
    res = invoke("evaluate", tmp_path / "gt.tif", tmp_path / "gt.tif", "--method", "watershed")
    assert res.exit_code == 1 and "--dataset" in flat(res.output)


# --------------------------------------------------------------------------- data-set mode


@pytest.fixture()
def threshold_method(monkeypatch):
    """A registered test method: connected components of bright pixels."""
    from nucli.models import registry
    from nucli.models.base import Method, MethodConfig, TileResult

    class Components(Method):
        def postprocess(self, raw):
            from skimage.measure import label

            return [TileResult(labels=label(tile[..., 0] > 127).astype(np.int32)) for tile in raw]

    registry.available()  # load the built-in methods first
    spec = registry.MethodSpec(
        name="components-test",
        summary="test only",
        config=MethodConfig(name="components-test"),
        builder=lambda config, weights, device: Components(config),
    )
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    return spec.name


def make_dataset(root: Path) -> Path:
    import imageio.v3 as iio

    split = root / "data" / "test"
    (split / "images").mkdir(parents=True)
    (split / "labels").mkdir()
    rows = []
    shapes = {"fl1": (40, 48), "fl2": (32, 32), "bf1": (36, 40)}
    for k, (name, shape) in enumerate(shapes.items()):
        lab = np.zeros(shape, np.uint16)
        lab[2:8, 2:8] = 5
        lab[12:20, 10:18] = 9
        if k == 0:
            lab[25:30, 30:40] = 2
        img = np.where(lab > 0, 220, 20).astype(np.uint8)
        if name.startswith("bf"):
            img = np.stack([img, img, img], axis=-1)  # RGB
        iio.imwrite(split / "images" / f"{name}.png", img)
        tifffile.imwrite(split / "labels" / f"{name}.tif", lab)
        modality = "brightfield-color" if name.startswith("bf") else "fluorescence"
        rows.append({"id": name, "split": "test", "modality": modality, "height": shape[0], "width": shape[1]})
    (root / "data" / "index.json").write_text(json.dumps(rows))
    return split


def test_dataset_mode_runs_method_and_scores(tmp_path, threshold_method):
    split = make_dataset(tmp_path)
    saved = tmp_path / "preds"
    data = run_json("evaluate", "--dataset", split, "--method", threshold_method, "--save-predictions", saved)
    assert data["method"] == threshold_method
    assert [r["image"] for r in data["images"]] == ["bf1", "fl1", "fl2"]
    assert all(data["aggregate"]["mean_over_images"][m] == 1.0 for m in METRICS)
    assert data["aggregate"]["n_true"] == 7
    assert set(data["by_modality"]) == {"brightfield-color", "fluorescence"}
    assert data["timing"]["megapixels"] == pytest.approx((40 * 48 + 32 * 32 + 36 * 40) / 1e6)
    assert data["timing"]["seconds_per_megapixel"] > 0
    saved_labels = tifffile.imread(saved / "fl1.tif")
    assert saved_labels.shape == (40, 48) and len(np.unique(saved_labels)) == 4
    # Saved predictions are not overwritten without --overwrite.
    res = invoke("evaluate", "--dataset", split, "--method", threshold_method, "--save-predictions", saved)
    assert res.exit_code == 2 and "--overwrite" in flat(res.output)
    # The saved predictions score the same through the file route.
    data2 = run_json("evaluate", saved, split / "labels")
    assert data2["aggregate"]["mean_over_images"] == data["aggregate"]["mean_over_images"]


def test_dataset_filters_and_table(tmp_path, threshold_method):
    split = make_dataset(tmp_path)
    data = run_json("evaluate", "--dataset", split, "--method", threshold_method, "--modality", "fluorescence")
    assert [r["image"] for r in data["images"]] == ["fl1", "fl2"]
    data = run_json("evaluate", "--dataset", split, "--method", threshold_method, "--limit", "1")
    assert [r["image"] for r in data["images"]] == ["bf1"]
    res = invoke("evaluate", "--dataset", split, "--method", threshold_method, "--per-image")
    assert res.exit_code == 0, res.output
    assert "s/MP" in res.output and "by modality" in res.output and "fl2" in res.output
    res = invoke("evaluate", "--dataset", split, "--method", threshold_method, "--modality", "xray")
    assert res.exit_code == 1 and "fluorescence" in flat(res.output)


def test_dataset_bad_layouts(tmp_path, threshold_method):
    split = make_dataset(tmp_path)
    (split / "labels" / "fl2.tif").unlink()
    res = invoke("evaluate", "--dataset", split, "--method", threshold_method)
    assert res.exit_code == 2 and "fl2" in flat(res.output) and "--allow-missing" in flat(res.output)
    data = run_json("evaluate", "--dataset", split, "--method", threshold_method, "--allow-missing")
    assert data["aggregate"]["n_images"] == 2 and data["skipped"] == ["fl2"]
    tifffile.imwrite(split / "labels" / "fl2.tif", np.zeros((10, 10), np.uint16))
    res = invoke("evaluate", "--dataset", split, "--method", threshold_method)
    assert res.exit_code == 2 and "fl2.tif" in flat(res.output) and "differs" in flat(res.output)
    res = invoke("evaluate", "--dataset", tmp_path / "nothing", "--method", threshold_method)
    assert res.exit_code == 2 and "does not exist" in flat(res.output)
    res = invoke("evaluate", "--dataset", tmp_path, "--method", threshold_method)
    assert res.exit_code == 2 and "images" in flat(res.output)
    res = invoke("evaluate", "--dataset", split, "--method", "no-such-method")
    assert res.exit_code == 1 and "known methods" in flat(res.output)


# --------------------------------------------------------------------------- real data


def test_dsb2018_test_labels_against_themselves(dsb2018, tmp_path):
    labels = dsb2018 / "test" / "labels"
    out = tmp_path / "self.json"
    res = invoke("evaluate", labels, labels, "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["aggregate"]["n_images"] == 56
    for key in ("mean_over_images", "pooled_over_nuclei"):
        assert all(data["aggregate"][key][m] == 1.0 for m in METRICS), key
    assert all(r[m] == 1.0 for r in data["images"] for m in METRICS)
    assert data["aggregate"]["n_true"] == data["aggregate"]["n_pred"] > 1000


def test_dsb2018_dataset_mode_with_watershed(dsb2018, tmp_path):
    pytest.importorskip("nucli.models.watershed")
    split = dsb2018 / "test"
    saved = tmp_path / "pred"
    data = run_json("evaluate", "--dataset", split, "--method", "watershed", "--limit", "3", "--save-predictions", saved)
    assert data["aggregate"]["n_images"] == 3 and data["timing"]["seconds_per_megapixel"] > 0
    assert sorted(p.stem for p in saved.glob("*.tif")) == [r["image"] for r in data["images"]]
    # Re-scoring the saved predictions through the file route gives the same numbers.
    rescored = run_json("evaluate", saved, split / "labels", "--allow-missing")
    assert rescored["aggregate"]["n_images"] == 3
    assert rescored["aggregate"]["mean_over_images"] == pytest.approx(data["aggregate"]["mean_over_images"])


def test_folder_of_gzipped_geojson(tmp_path):
    import gzip

    gdir, pdir = tmp_path / "gt", tmp_path / "pred"
    gdir.mkdir()
    pdir.mkdir()
    gt = np.zeros((20, 20), np.uint16)
    gt[2:8, 3:9] = 1
    tifffile.imwrite(gdir / "slide1.tif", gt)
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(3, 2, 9, 8)]}}]}
    with gzip.open(pdir / "slide1.geojson.gz", "wt") as fh:
        json.dump(fc, fh)
    data = run_json("evaluate", pdir, gdir)
    assert [r["image"] for r in data["images"]] == ["slide1"] and data["images"][0]["aji"] == 1.0


def test_dsb2018_outlines_from_stitching_rasterise_back_exactly(dsb2018, tmp_path):
    """GeoJSON outlines as the exporter traces them score 1.0 against the labels they came from."""
    stitching = pytest.importorskip("nucli.stitching")
    labels_path = sorted((dsb2018 / "test" / "labels").glob("*.tif"))[1]
    labels = tifffile.imread(labels_path)
    features = []
    for k in np.unique(labels)[1:]:
        ys, xs = np.nonzero(labels == k)
        mask = (labels == k)[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        poly = stitching.polygon_of(mask, xs.min(), ys.min())
        coords = [[float(x), float(y)] for x, y in poly.exterior.coords]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords]}})
    (tmp_path / "nuclei.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    data = run_json("evaluate", tmp_path / "nuclei.geojson", labels_path)
    assert data["images"][0]["n_pred"] == data["images"][0]["n_true"] == len(np.unique(labels)) - 1
    assert all(data["images"][0][m] == 1.0 for m in METRICS)
