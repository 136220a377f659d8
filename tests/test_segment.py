"""`nucli segment` / `nucli stitch` end to end: outputs, resume after an interruption,
settings guard, coordinate frame across resolutions, the real slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nucli.cli import app
from nucli.export.geojson import check_qupath_feature, load, qupath_features
from nucli.models import registry
from nucli.models.base import MethodConfig
from nucli.models.registry import MethodSpec
from nucli.models.watershed import CONFIG as WS_CONFIG
from nucli.models.watershed import WatershedMethod
from nucli.pipeline import segment_store, store_from_array
from nucli.tiling.store import RunStore
from test_watershed import HE_BACKGROUND, HE_NUCLEUS, blob_labels, render

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def write_png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="module")
def slide_png(tmp_path_factory):
    """A synthetic H&E-like picture (900 x 700 px) with ~400 nuclei of radius 8-12 px."""
    d = tmp_path_factory.mktemp("slide")
    gt = blob_labels(900, 700, 400, seed=4, r=(8, 12), touching_pairs=0)
    return write_png(d / "slide.png", render(gt, HE_NUCLEUS, HE_BACKGROUND, seed=4)), gt


class Counting(WatershedMethod):
    """Watershed that records how many tiles it saw and can stop after ``stop_after`` tiles."""

    seen: list[int] = []
    stop_after: int | None = None

    def segment(self, tiles):
        n = len(tiles) if np.ndim(tiles) == 4 else 1
        if Counting.stop_after is not None and sum(Counting.seen) + n > Counting.stop_after:
            raise KeyboardInterrupt
        Counting.seen.append(n)
        return super().segment(tiles)


@pytest.fixture
def counting(monkeypatch):
    registry.available()  # load the built-in methods first
    cfg = MethodConfig.from_dict({**WS_CONFIG.to_dict(), "name": "counting", "tile_size": 256, "batch_size": 2})
    monkeypatch.setitem(registry._REGISTRY, "counting",
                        MethodSpec("counting", "test", cfg, lambda c, w, d: Counting(c)))
    Counting.seen = []
    Counting.stop_after = None
    yield Counting
    Counting.seen = []
    Counting.stop_after = None


# ----------------------------------------------------------------------------- the commands
def test_segment_slide_writes_every_output(tmp_path, slide_png):
    png, gt = slide_png
    out = tmp_path / "res.geojson"
    r = invoke("segment", png, "--mpp", "0.5", "--method", "watershed", "-o", out, "-f", "csv", "-f", "labels",
               "--overlay", tmp_path / "o.png", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    feats = qupath_features(load(out))
    assert summary["nuclei"] == len(feats) and abs(len(feats) - gt.max()) <= 0.05 * gt.max()
    assert all(check_qupath_feature(f, bounds=(900, 700)) == [] for f in feats)
    for p in ("res.csv", "res.labels.zarr", "o.png", "res.nucli.zarr"):
        assert (tmp_path / p).exists(), p
    assert summary["density_per_mm2"] == pytest.approx(summary["nuclei"] / summary["tissue_area_mm2"], rel=0.01)
    store = RunStore.open(tmp_path / "res.nucli.zarr")
    assert store.is_complete("segment") and store.stage_meta("segment")["method"] == "watershed"

    # existing outputs are kept; a rerun with --overwrite reuses the finished tiles
    again = invoke("segment", png, "--mpp", "0.5", "--method", "watershed", "-o", out, "--json")
    assert again.exit_code == 2 and "--overwrite" in again.output
    again = invoke("segment", png, "--mpp", "0.5", "--method", "watershed", "-o", out, "--overwrite", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["tiles_segmented_now"] == 0


def test_stitch_command(tmp_path, slide_png):
    png, _ = slide_png
    r = invoke("tile", png, "--mpp", "0.5", "--method", "watershed", "-o", tmp_path / "run.zarr", "--quiet")
    assert r.exit_code == 0, r.output
    r = invoke("stitch", tmp_path / "run.zarr", "-o", tmp_path / "a.geojson")
    assert r.exit_code == 2 and "not segmented" in r.output
    r = invoke("segment", tmp_path / "run.zarr", "--method", "watershed", "-o", tmp_path / "a.geojson", "--quiet")
    assert r.exit_code == 0, r.output
    r = invoke("stitch", tmp_path / "run.zarr", "-o", tmp_path / "b.geojson", "--quiet")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()


def test_other_method_on_same_store_is_refused(tmp_path, slide_png, counting):
    png, _ = slide_png
    store = tmp_path / "run.zarr"
    assert invoke("segment", png, "--mpp", "0.5", "--method", "watershed", "-o", tmp_path / "a.geojson",
                  "--store", store, "--quiet").exit_code == 0
    r = invoke("segment", store, "--method", "counting", "-o", tmp_path / "b.geojson", "--quiet")
    assert r.exit_code == 2 and "--overwrite" in r.output and not (tmp_path / "b.geojson").exists()
    r = invoke("segment", store, "--method", "counting", "-o", tmp_path / "b.geojson", "--quiet", "--overwrite")
    assert r.exit_code == 0 and sum(counting.seen) == RunStore.open(store).n_tiles


def test_unknown_method_and_bad_output(tmp_path, slide_png):
    png, _ = slide_png
    r = invoke("segment", png, "--method", "nope", "-o", tmp_path / "a.geojson")
    assert r.exit_code == 1 and "watershed" in r.output
    r = invoke("segment", png, "--method", "watershed", "-o", tmp_path / "a.txt")
    assert r.exit_code == 1 and "--format" in r.output
    r = invoke("segment", tmp_path / "missing.svs", "--method", "watershed", "-o", tmp_path / "a.geojson")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_interrupted_run_resumes_and_matches(tmp_path, slide_png, counting):
    png, _ = slide_png
    args = ["--mpp", "0.5", "--method", "counting", "--tile-size", "256", "--overlap", "64", "-f", "csv",
            "--quiet"]
    ref = tmp_path / "ref"
    assert invoke("segment", png, "-o", ref / "n.geojson", *args).exit_code == 0
    n_tiles = RunStore.open(ref / "n.nucli.zarr").n_tiles
    assert n_tiles >= 9 and sum(counting.seen) == n_tiles

    counting.seen.clear()
    counting.stop_after = 5
    run = tmp_path / "run"
    r = invoke("segment", png, "-o", run / "n.geojson", *args)
    assert r.exit_code == 130
    assert not (run / "n.geojson").exists() and not (run / "n.csv").exists()
    done = int(RunStore.open(run / "n.nucli.zarr").done("segment").sum())
    assert done == sum(counting.seen) == 4  # batches of 2: the third batch was cut off

    counting.seen.clear()
    counting.stop_after = None
    assert invoke("segment", png, "-o", run / "n.geojson", *args).exit_code == 0
    assert sum(counting.seen) == n_tiles - done  # only unfinished tiles were computed
    assert (run / "n.geojson").read_bytes() == (ref / "n.geojson").read_bytes()
    assert (run / "n.csv").read_bytes() == (ref / "n.csv").read_bytes()


# ----------------------------------------------------------------------------- coordinate frame
def _centroids(path):
    import shapely
    from shapely.geometry import shape

    pts = [shape(f["geometry"]).centroid for f in qupath_features(load(path))]
    return shapely.get_coordinates(pts)


def _match_errors(a, b, max_dist):
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(b).query(a)
    return dist[dist < max_dist]


def test_lower_resolution_lands_nuclei_at_same_level0_positions(tmp_path, slide_png):
    png, gt = slide_png
    full = tmp_path / "full.geojson"
    half = tmp_path / "half.geojson"
    # --mpp 0.5 -> working = level 0; --mpp 0.25 -> the method's 0.5 µm/px is level 0 downsampled 2x
    assert invoke("segment", png, "--mpp", "0.5", "--method", "watershed", "-o", full, "--quiet").exit_code == 0
    assert invoke("segment", png, "--mpp", "0.25", "--method", "watershed", "-o", half, "--quiet").exit_code == 0
    assert RunStore.open(tmp_path / "half.nucli.zarr").meta["downsample"] == pytest.approx(2.0)
    a, b = _centroids(full), _centroids(half)
    errors = _match_errors(a, b, max_dist=8.0)
    assert len(errors) >= 0.95 * min(len(a), len(b))
    assert np.median(errors) < 1.0  # level-0 px; 1 working px of the coarse run is 2
    assert np.percentile(errors, 95) < 2.0
    ys, xs = np.nonzero(gt)
    assert b[:, 0].max() <= 900 and b[:, 1].max() <= 700


def test_store_downsample_maps_to_level0(tmp_path):
    """The same picture stored at downsample 1 and 2 (block mean): nuclei at the same level-0 places."""
    from skimage.measure import block_reduce

    from nucli.export import make_sinks, resolve_outputs
    from nucli.stitching import stitch_store

    gt = blob_labels(800, 640, 250, seed=9, r=(8, 12), touching_pairs=0)
    img = render(gt, HE_NUCLEUS, HE_BACKGROUND, seed=9, noise=2.0)
    low = np.round(block_reduce(img.astype(np.float32), (2, 2, 1), np.mean)).astype(np.uint8)
    method = WatershedMethod(WS_CONFIG)
    results = {}
    for name, pic, d in (("l0", img, 1.0), ("l1", low, 2.0)):
        store = store_from_array(tmp_path / f"{name}.zarr", pic, tile_size=256, overlap=64, downsample=d,
                                 source_mpp=0.25, level0_size=(800, 640), fingerprint="same")
        segment_store(store, method, progress=False)
        outs = resolve_outputs(tmp_path / f"{name}.geojson")
        stitch_store(store, make_sinks(outs), progress=False)
        results[name] = _centroids(outs["geojson"])
    errors = _match_errors(results["l0"], results["l1"], max_dist=8.0)
    assert len(errors) >= 0.95 * len(results["l0"])
    assert np.mean(errors) < 2.0 and np.median(errors) < 1.0  # < 1 working px of the coarse store


# ----------------------------------------------------------------------------- the real slide
@pytest.fixture(scope="module")
def cmu_run(cmu_slide, tmp_path_factory):
    d = tmp_path_factory.mktemp("cmu")
    r = invoke("segment", cmu_slide, "--method", "watershed", "-o", d / "cmu.geojson", "--overlay", d / "cmu.png",
               "-f", "csv", "--json")
    assert r.exit_code == 0, r.output
    return d, json.loads(r.output.strip().splitlines()[-1])


@pytest.mark.data
def test_cmu_end_to_end(cmu_run):
    d, summary = cmu_run
    feats = qupath_features(load(d / "cmu.geojson"))
    assert summary["nuclei"] == len(feats) > 1000
    assert summary["residual_overlaps_removed"] <= 0.005 * summary["nuclei"]
    assert all(check_qupath_feature(f, bounds=(2220, 2967)) == [] for f in feats)
    assert "Nucleus: Area µm^2" in feats[0]["properties"]["measurements"]
    assert (d / "cmu.png").stat().st_size > 0 and (d / "cmu.csv").exists()
    assert 0.1 < summary["tissue_area_mm2"] < 1.7  # the slide is 1.1 x 1.5 mm


@pytest.mark.data
@pytest.mark.slow
def test_cmu_lower_resolution_same_positions(cmu_run, cmu_slide):
    d, _ = cmu_run
    coarse = d / "coarse.geojson"
    r = invoke("segment", cmu_slide, "--method", "watershed", "--mpp-target", "1.0", "-o", coarse, "--quiet")
    assert r.exit_code == 0, r.output
    a, b = _centroids(d / "cmu.geojson"), _centroids(coarse)
    errors = _match_errors(b, a, max_dist=6.0)
    assert len(errors) > 0.5 * len(b)
    assert np.median(errors) < 2.0  # level-0 px: below one working px (2 px) of the coarse run


# ----------------------------------------------------------------------------- a real kill
@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_the_same_output(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    gt = blob_labels(2600, 1800, 3000, seed=12, r=(6, 11), touching_pairs=50)
    png = write_png(tmp_path / "big.png", render(gt, HE_NUCLEUS, HE_BACKGROUND, seed=12))
    cmd = [sys.executable, "-c", "from nucli.cli import app; app()", "segment", str(png), "--mpp", "0.5",
           "--method", "watershed", "--batch-size", "1", "--quiet", "--json"]
    ref = subprocess.run([*cmd, "-o", str(tmp_path / "ref" / "n.geojson")], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    n_tiles = RunStore.open(tmp_path / "ref" / "n.nucli.zarr").n_tiles

    out = tmp_path / "run" / "n.geojson"
    proc = subprocess.Popen([*cmd, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store_path = tmp_path / "run" / "n.nucli.zarr"
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            done = int(RunStore.open(store_path).done("segment").sum())
        except Exception:  # noqa: BLE001 - the store may not exist yet
            done = 0
        if done >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = done
            break
        time.sleep(0.05)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    assert not out.exists()
    done_after_kill = int(RunStore.open(store_path).done("segment").sum())
    assert done_after_kill < n_tiles

    again = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["tiles_segmented_now"] == n_tiles - done_after_kill
    assert out.read_bytes() == (tmp_path / "ref" / "n.geojson").read_bytes()


def test_unfinished_tiling_is_refused(tmp_path):
    from nucli.errors import StoreError

    store = store_from_array(tmp_path / "run.zarr", np.full((300, 300, 3), 200, np.uint8), tile_size=128,
                             overlap=32)
    store.array("done/tile")[1] = 0
    with pytest.raises(StoreError, match="nucli tile"):
        segment_store(store, WatershedMethod(WS_CONFIG), progress=False)
