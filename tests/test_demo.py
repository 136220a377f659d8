"""`nucli demo`, the demo slide, the Python API and the folder pipeline example."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nucli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _has_weights(method: str) -> bool:
    from nucli.models.registry import get_spec

    spec = get_spec(method)
    return not spec.needs_weights or (spec.weights_path is not None and spec.weights_path.exists())


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------- the demo slide


def test_tissue_ships_with_scikit_image_and_loads_offline(no_network):
    import skimage.data

    from nucli import demo

    demo._ihc.cache_clear()
    bundled = Path(skimage.data.__file__).parent / "ihc.png"
    assert bundled.is_file(), "scikit-image no longer bundles ihc.png"
    ihc = demo.demo_tissue("ihc")
    assert ihc.shape == (512, 512, 3) and ihc.dtype == np.uint8
    h = demo.demo_tissue("hematoxylin")
    assert h.shape == ihc.shape
    # removing DAB makes the image lighter and bluer, never darker
    assert h.astype(int).sum() > ihc.astype(int).sum()
    assert h[..., 2].mean() > h[..., 0].mean()


def test_hematoxylin_variant_keeps_the_hematoxylin(no_network):
    from nucli.demo import demo_tissue
    from nucli.postprocess import hematoxylin

    ihc, h = demo_tissue("ihc"), demo_tissue("hematoxylin")
    a, b = hematoxylin(ihc), hematoxylin(h)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_demo_slide_is_a_pyramid_with_pixel_size(tmp_path, no_network):
    from nucli.demo import DEMO_MPP, MARGIN, demo_tissue, write_demo_slide
    from nucli.slide import open_slide

    path = write_demo_slide(tmp_path / "s.svs", crop=128, stain="ihc")
    with open_slide(path) as s:
        assert s.dimensions == (128 + 2 * MARGIN, 128 + 2 * MARGIN)
        assert s.level_downsamples == [1.0, 2.0, 4.0]
        assert s.mpp == pytest.approx(DEMO_MPP)
        assert s.vendor == "aperio"
        assert "thumbnail" in s.associated_images and "label" in s.associated_images
        region = s.read_region(MARGIN, MARGIN, 128, 128).astype(int)
        glass = s.read_region(0, 0, 32, 32)
    src = demo_tissue("ihc")[192:320, 192:320].astype(int)
    assert np.abs(region - src).mean() < 4  # the real pixels, through JPEG
    assert glass.min() > 230  # glass around the tissue


# --------------------------------------------------------------------------- nucli demo


def _run_demo(out: Path, *extra: str):
    return runner.invoke(app, ["demo", "-o", str(out), "--method", "watershed", "--crop", "256", *extra])


def test_demo_writes_geojson_csv_overlay_and_says_where(tmp_path):
    from PIL import Image

    from nucli.demo import MARGIN
    from nucli.postprocess import hematoxylin

    out = tmp_path / "demo"
    res = _run_demo(out, "--json", "--stain", "ihc")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["status"] == "done" and summary["method"] == "watershed"
    for key in ("geojson", "measurements", "overlay", "slide"):
        assert Path(summary[key]).is_file(), key
    assert Path(summary["geojson"]).parent == out / "watershed-ihc-crop256"

    fc = json.loads(Path(summary["geojson"]).read_text())
    with open(summary["measurements"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert summary["nuclei"] == len(fc["features"]) == len(rows) >= 1
    assert {f["id"] for f in fc["features"]} == {r["id"] for r in rows}
    assert all(f["properties"]["objectType"] == "detection" for f in fc["features"])

    # nuclei sit on the tissue, not on the glass, and on hematoxylin-rich pixels
    lo, hi = MARGIN, MARGIN + 256
    for r in rows:
        assert lo <= float(r["centroid_x_px"]) <= hi and lo <= float(r["centroid_y_px"]) <= hi
    slide_px = np.asarray(Image.open(summary["overlay"]).convert("RGB"))
    assert slide_px.shape[:2] == (256 + 2 * MARGIN, 256 + 2 * MARGIN)
    from nucli.demo import demo_tissue

    tissue_h = float(np.median(hematoxylin(demo_tissue("ihc")[128:384, 128:384])))
    nuclei_h = np.mean([float(r["hematoxylin_mean"]) for r in rows])
    assert nuclei_h > 1.5 * tissue_h
    # outlines drawn in green where the nuclei are
    green = np.all(slide_px == (0, 255, 0), axis=2)
    for r in rows:
        x, y = int(float(r["centroid_x_px"])), int(float(r["centroid_y_px"]))
        assert green[max(0, y - 12):y + 12, max(0, x - 12):x + 12].any()


def test_demo_rerun_reports_existing_outputs_without_touching_them(tmp_path):
    out = tmp_path / "demo"
    assert _run_demo(out, "--quiet").exit_code == 0
    files = sorted(p for p in out.rglob("*") if p.is_file() and ".nucli.zarr" not in str(p))
    before = {p: p.stat().st_mtime_ns for p in files}
    res = _run_demo(out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "exists"
    assert {p: p.stat().st_mtime_ns for p in files} == before
    res = _run_demo(out, "--json", "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "done"


def test_demo_human_output_names_the_files(tmp_path):
    res = _run_demo(tmp_path / "d")
    assert res.exit_code == 0, res.output
    assert "overlay.png" in res.stdout and "nuclei.geojson" in res.stdout and "Import objects" in res.stdout


def test_demo_quiet_prints_nothing(tmp_path):
    res = _run_demo(tmp_path / "d", "--quiet")
    assert res.exit_code == 0
    assert res.stdout.strip() == ""


def test_demo_bad_inputs(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    res = runner.invoke(app, ["demo", "-o", str(f), "--method", "watershed"])
    assert res.exit_code == 2 and "is a file" in res.output
    res = runner.invoke(app, ["demo", "-o", str(tmp_path / "d"), "--method", "nope"])
    assert res.exit_code == 1 and "known methods" in res.output
    res = runner.invoke(app, ["demo", "-o", str(tmp_path / "d"), "--stain", "he", "--method", "watershed"])
    assert res.exit_code == 1 and "stain" in res.output
    res = runner.invoke(app, ["demo", "--crop", "5"])
    assert res.exit_code == 1


def test_default_method_without_weights_says_what_to_do(tmp_path):
    if _has_weights("gensegnet"):
        pytest.skip("gensegnet weights are installed")
    res = runner.invoke(app, ["demo", "-o", str(tmp_path / "d")])
    assert res.exit_code == 2
    assert "--method watershed" in res.output and "Traceback" not in res.output


def test_default_demo_outlines_nuclei(tmp_path):
    """The README's first command: the default method on the full demo slide."""
    if not _has_weights("gensegnet"):
        pytest.skip("gensegnet weights not installed yet")
    from nucli.demo import demo_tissue
    from nucli.postprocess import hematoxylin

    res = runner.invoke(app, ["demo", "-o", str(tmp_path / "d"), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["method"] == "gensegnet" and s["nuclei"] >= 50
    with open(s["measurements"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    tissue_h = float(np.median(hematoxylin(demo_tissue("ihc"))))
    assert np.median([float(r["hematoxylin_mean"]) for r in rows]) > 1.5 * tissue_h


# --------------------------------------------------------------------------- Python API


def _discs(shape=(300, 420), r=9):
    from nucli.synthetic import ellipse_image

    centers = [(x, y) for y in range(30, shape[0] - 20, 48) for x in range(30, shape[1] - 20, 52)]
    return ellipse_image(shape, centers, radius=r), centers


def test_segment_array_labels_and_table_agree():
    import nucli

    img, centers = _discs()
    labels, table = nucli.segment_array(img, method="watershed")
    assert labels.shape == img.shape[:2] and labels.dtype == np.int32
    ids = np.unique(labels[labels > 0])
    assert len(ids) == len(centers)
    assert sorted(table["label"].tolist()) == ids.tolist()
    # each row's centroid is its disc's centre; areas are the label pixel counts
    for k, lab in enumerate(table["label"]):
        ys, xs = np.nonzero(labels == lab)
        assert table["area_px2"][k] == len(ys)
        assert table["centroid_x_px"][k] == pytest.approx(xs.mean() + 0.5, abs=1e-3)
    found = sorted(zip(np.round(table["centroid_x_px"] - 0.5), np.round(table["centroid_y_px"] - 0.5)))
    assert found == sorted((float(x), float(y)) for x, y in centers)
    assert "area_um2" not in table  # no pixel size given


def test_segment_array_resamples_to_the_method_pixel_size():
    import nucli

    img, centers = _discs((360, 480), r=18)  # discs of 36 px at 0.25 µm/px = 18 px at 0.5 µm/px
    labels, table = nucli.segment_array(img, method="watershed", mpp=0.25)
    assert labels.shape == img.shape[:2]
    assert len(table["label"]) == len(centers)
    # areas in µm² match the discs (π (18 px · 0.25 µm)²), labels cover the discs at full resolution
    assert np.median(table["area_um2"]) == pytest.approx(np.pi * (18 * 0.25) ** 2, rel=0.15)
    for x, y in centers:
        assert labels[y, x] > 0


def test_segment_array_rejects_bad_input():
    import nucli
    from nucli.errors import InputError, UsageError

    with pytest.raises(InputError):
        nucli.segment_array(np.zeros((10, 10, 3), np.float32), method="watershed")
    with pytest.raises(InputError):
        nucli.segment_array(np.zeros((10, 10, 2), np.uint8), method="watershed")
    with pytest.raises(UsageError):
        nucli.segment_array(np.zeros((10, 10), np.uint8), method="watershed", mpp=-1)
    with pytest.raises(UsageError):
        nucli.segment_array(np.zeros((10, 10), np.uint8), method="nope")


def test_python_api_example_runs(tmp_path):
    env = {**os.environ, "NUCLI_EXAMPLE_METHOD": "watershed"}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py")], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "nuclei" in res.stdout


# --------------------------------------------------------------------------- examples/pipeline_folder.sh


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_folder_pipeline_skips_finished_slides(tmp_path):
    from nucli.demo import write_demo_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    write_demo_slide(slides / "a.svs", crop=128, stain="ihc")
    write_demo_slide(slides / "b.svs", crop=160, stain="ihc")
    (slides / "notes.txt").write_text("not a slide")
    out = tmp_path / "results"
    script = ROOT / "examples" / "pipeline_folder.sh"
    env = {**os.environ, "METHOD": "watershed", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    first = subprocess.run(["bash", str(script), str(slides), str(out)], capture_output=True, text=True, env=env,
                           timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    for stem in ("a", "b"):
        assert (out / f"{stem}.geojson").is_file() and (out / f"{stem}.csv").is_file()
        assert (out / f"{stem}.overlay.png").is_file()
    summaries = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert sorted(Path(s["outputs"][0]).name for s in summaries) == ["a.geojson", "b.geojson"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.geojson")}

    second = subprocess.run(["bash", str(script), str(slides), str(out)], capture_output=True, text=True, env=env,
                            timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert sum(line.startswith("skip ") for line in second.stdout.splitlines()) == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.geojson")} == mtimes

    # a broken slide is reported, the others still run, and the exit status says something failed
    (slides / "c.svs").write_bytes(b"II*\x00broken")
    third = subprocess.run(["bash", str(script), str(slides), str(out)], capture_output=True, text=True, env=env,
                           timeout=600)
    assert third.returncode == 1
    assert "c.svs" in third.stdout + third.stderr and not (out / "c.geojson").exists()
