"""Bad inputs and faults across the whole tool: every one gets a one-line answer and an exit code,
no run loses work, no file runs code. Each test backs a row of docs/reliability.md."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from nucli.cli import app
from nucli.synthetic import make_tissue, write_pyramidal_tiff
from nucli.tiling.store import RunStore
from test_watershed import HE_BACKGROUND, HE_NUCLEUS, blob_labels, render

runner = CliRunner()
FAST = ["--mpp-target", "0.5", "--tile-size", "256", "--overlap", "32", "--quiet"]
SEG = ["--method", "watershed", "--mpp", "0.5", "--tile-size", "256", "--overlap", "48", "--quiet"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int, *words: str) -> str:
    """The result failed with ``code`` and a single stderr line holding every word (no traceback)."""
    assert result.exit_code == code, result.output
    err = " ".join(result.stderr.split())
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output, result.stderr
    for w in words:
        assert w in err, (w, err)
    return err


def write_png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(image).save(path)
    return path


def tile_entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def jpeg_svs(tmp_path_factory):
    """A JPEG-compressed SVS (1024 x 768 at 0.5 µm/px, 12 tiles of 256 px) with tissue everywhere."""
    d = tmp_path_factory.mktemp("svs")
    tissue = make_tissue(1024, 768, 1, seed=3, island_radius=(370, 380))
    return write_pyramidal_tiff(d / "slide.svs", tissue.render, 1024, 768, mpp=0.5, compression="jpeg", levels=1)


@pytest.fixture(scope="module")
def he_png(tmp_path_factory):
    """A synthetic H&E-like picture (640 x 480 px) with ~150 nuclei of radius 7-10 px."""
    d = tmp_path_factory.mktemp("he")
    gt = blob_labels(640, 480, 150, seed=5, r=(7, 10), touching_pairs=0)
    return write_png(d / "he.png", render(gt, HE_NUCLEUS, HE_BACKGROUND, seed=5))


@pytest.fixture(scope="module")
def segmented(he_png, tmp_path_factory):
    """``nucli segment`` of he_png: (folder, GeoJSON path, run store path), never modified by tests."""
    d = tmp_path_factory.mktemp("ref")
    out = d / "n.geojson"
    r = invoke("segment", he_png, "-o", out, *SEG)
    assert r.exit_code == 0, r.output
    return d, out, d / "n.nucli.zarr"


def copy_run(segmented, dest: Path) -> tuple[Path, Path]:
    """A copy of the reference run (GeoJSON, store) to damage."""
    _, out, store = segmented
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(out, dest / out.name)
    shutil.copytree(store, dest / store.name)
    return dest / out.name, dest / store.name


def corrupt_tile(src: Path, dest: Path, k: int, zero: bool = False) -> Path:
    """``src`` with the compressed bytes of level-0 tile ``k`` overwritten (JPEG header kept unless ``zero``)."""
    with tifffile.TiffFile(src) as tif:
        o, c = tif.pages[0].dataoffsets[k], tif.pages[0].databytecounts[k]
    data = bytearray(src.read_bytes())
    start = o if zero else o + 200
    data[start : o + c - 2] = b"\0" * (o + c - 2 - start) if zero else np.random.default_rng(k).integers(
        0, 256, o + c - 2 - start, dtype=np.uint8).tobytes()
    dest.write_bytes(bytes(data))
    return dest


# ====================================================================== slides
@pytest.mark.parametrize("content, name", [(b"%PDF-1.4\n" + b"x" * 200, "scan.ndpi"),
                                           (b"PK\x03\x04" + b"\0" * 200, "slide.svs")])
def test_wrong_format_behind_a_slide_extension(tmp_path, content, name):
    (tmp_path / name).write_bytes(content)
    r = invoke("tile", tmp_path / name, "-o", tmp_path / "run.zarr", *FAST)
    one_line_error(r, 2, name, "not a slide or image nucli can read")
    assert not (tmp_path / "run.zarr").exists()


def test_a_png_named_svs_is_read_by_its_content(tmp_path, he_png):
    shutil.copy(he_png, tmp_path / "he.svs")
    r = invoke("tile", tmp_path / "he.svs", "-o", tmp_path / "run.zarr", "--mpp", "0.5", *FAST, "--json")
    assert r.exit_code == 0, r.output
    assert RunStore.open(tmp_path / "run.zarr").meta["source"]["backend"] == "image"


@pytest.mark.parametrize("zero", [False, True], ids=["garbled-jpeg", "zeroed-jpeg"])
def test_a_corrupt_jpeg_tile_stops_the_run_naming_the_tile(jpeg_svs, tmp_path, zero):
    bad = corrupt_tile(jpeg_svs, tmp_path / "bad.svs", k=5, zero=zero)
    out = tmp_path / "run.zarr"
    args = ["tile", bad, "-o", out, "--mpp-target", "0.5", "--tile-size", "256", "--overlap", "0", "--quiet",
            "--no-tissue-mask"]
    err = one_line_error(invoke(*args), 2, "bad.svs", "tile", "row 1, col 1", "cannot be read", "damaged")
    assert "x=256 y=256" in err
    # the tiles read before it are kept; the damaged one is never marked done (no silent hole)
    store = RunStore.open(out)
    done = store.done("tile")
    assert not done.all()
    bad_i = [i for i, (r, c) in enumerate(store.indices()) if (r, c) == (1, 1)][0]
    assert not done[bad_i]
    # a rerun resumes and stops at the same tile again
    one_line_error(invoke(*args), 2, "row 1, col 1")


def _patch_header(src: Path, dest: Path, width: int, height: int) -> Path:
    with tifffile.TiffFile(src) as tif:
        tags = tif.pages[0].tags
        fields = [(tags["ImageWidth"], width), (tags["ImageLength"], height)]
        data = bytearray(src.read_bytes())
        for tag, value in fields:
            fmt = "<I" if tag.dtype == 4 else "<H"
            data[tag.valueoffset : tag.valueoffset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize("layout", ["tiled", "stripped"])
def test_absurd_dimensions_in_the_header(tmp_path, layout):
    rgb = np.full((64, 64, 3), 200, np.uint8)
    src = tmp_path / "small.tif"
    if layout == "tiled":
        tifffile.imwrite(src, rgb, tile=(32, 32), photometric="rgb")
        words = ["3000000 x 3000000 px", "tiles"]
    else:
        tifffile.imwrite(src, rgb, photometric="rgb")
        words = ["3000000 x 64 px", "larger than any slide"]
    huge = _patch_header(src, tmp_path / "huge.tif", 3_000_000, 3_000_000 if layout == "tiled" else 64)
    t0 = time.perf_counter()
    one_line_error(invoke("tile", huge, "-o", tmp_path / "run.zarr", "--mpp", "0.5", *FAST), 2, "huge.tif", *words)
    one_line_error(invoke("info", huge, "--probe", "0"), 2, "huge.tif")
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "run.zarr").exists()


def test_cmyk_images_are_converted_to_rgb(tmp_path):
    """CMYK TIFFs (stripped or tiled) and JPEGs read as RGB, like OpenSlide (libtiff) and Pillow convert them."""
    from PIL import Image

    from nucli.slide import open_slide

    cmyk = np.zeros((120, 160, 4), np.uint8)
    cmyk[40:80, 50:110] = (100, 180, 50, 60)
    expected = ((255 - cmyk[..., :3].astype(int)) * (255 - cmyk[..., 3:4].astype(int)) // 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "strips.tif", cmyk, photometric="separated")
    tifffile.imwrite(tmp_path / "tiles.tif", cmyk, photometric="separated", tile=(64, 64))
    rgb = np.full((120, 160, 3), 230, np.uint8)
    rgb[40:80, 50:110] = (90, 40, 120)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    for name in ("strips.tif", "tiles.tif"):
        with open_slide(tmp_path / name) as s:
            np.testing.assert_array_equal(s.read_region(0, 0, 160, 120), expected, err_msg=name)
    with open_slide(tmp_path / "cmyk.jpg") as s:
        assert np.abs(s.read_region(0, 0, 160, 120).astype(int) - rgb).max() <= 4
    r = invoke("tile", tmp_path / "strips.tif", "-o", tmp_path / "run.zarr", "--mpp", "0.5", "--tile-size", "64",
               "--overlap", "0", "--mpp-target", "0.5", "--quiet", "--no-tissue-mask")
    assert r.exit_code == 0, r.output
    store = RunStore.open(tmp_path / "run.zarr")
    for i, (x, y) in enumerate(store.origins()):
        np.testing.assert_array_equal(store.read_tile(i), expected[y : y + 64, x : x + 64])


def test_16bit_cmyk_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "c16.tif", np.zeros((32, 32, 4), np.uint16), photometric="separated")
    one_line_error(invoke("tile", tmp_path / "c16.tif", "-o", tmp_path / "r.zarr", "--mpp", "0.5", *FAST), 2,
                   "c16.tif", "CMYK", "convert it to RGB")


def test_rgba_16bit_and_gray_tiffs_reach_the_tiles_as_rgb(tmp_path):
    rgb = np.full((64, 64, 3), 230, np.uint8)
    rgb[16:48, 16:48] = (90, 40, 120)
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([rgb, np.full((64, 64), 255, np.uint8)]), photometric="rgb",
                     extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "gray.tif", rgb[..., 0])
    tifffile.imwrite(tmp_path / "u16.tif", rgb.astype(np.uint16) * 257, photometric="rgb")
    for name, want in (("rgba.tif", rgb), ("gray.tif", np.repeat(rgb[..., :1], 3, axis=2)), ("u16.tif", None)):
        out = tmp_path / f"{name}.zarr"
        r = invoke("tile", tmp_path / name, "-o", out, "--mpp", "0.5", "--mpp-target", "0.5", "--tile-size", "64",
                   "--overlap", "0", "--quiet", "--no-tissue-mask")
        assert r.exit_code == 0, (name, r.output)
        tile = RunStore.open(out).read_tile(0)
        assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
        if want is not None:
            np.testing.assert_array_equal(tile, want, err_msg=name)
        else:  # 16-bit: one linear scale for the whole image (0.5th -> 0, 99.5th percentile -> 255)
            assert tuple(tile[30, 30]) == (67, 0, 107) and tuple(tile[0, 0]) == (255, 255, 255)


# ====================================================================== run stores
def test_a_store_from_a_newer_nucli_is_refused(segmented, tmp_path):
    import zarr

    out, store = copy_run(segmented, tmp_path)
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["nucli"] = {**g.attrs["nucli"], "format_version": 99}
    one_line_error(invoke("stitch", store, "-o", tmp_path / "x.geojson"), 2, "newer nucli", "upgrade")
    one_line_error(invoke("segment", store, "--method", "watershed", "-o", tmp_path / "y.geojson"), 2, "newer nucli")
    assert not (tmp_path / "x.geojson").exists() and not (tmp_path / "y.geojson").exists()


@pytest.mark.parametrize("field, value, words", [
    ("n_tiles", "many", ["n_tiles"]),
    ("working_size", [0, -3], ["working_size"]),
    ("overlap", 999, ["overlap"]),
    ("stages", ["segment"], ["stages"]),
])
def test_damaged_store_metadata_is_a_one_line_error(segmented, tmp_path, field, value, words):
    import zarr

    _, store = copy_run(segmented, tmp_path)
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["nucli"] = {**g.attrs["nucli"], field: value}
    one_line_error(invoke("stitch", store, "-o", tmp_path / "x.geojson"), 2, "metadata is damaged", *words)


def _delete_chunks(store: Path, name: str, tiles: list[int]) -> None:
    import zarr

    arr = zarr.open_group(str(store), mode="r")[name]
    for i in tiles:
        (store / name / arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))).unlink()


def test_deleted_label_and_tile_chunks_are_found_and_recomputed(segmented, he_png, tmp_path):
    _, ref, _ = segmented
    out, store = copy_run(segmented, tmp_path)
    n = RunStore.open(store).n_tiles
    assert n >= 6
    _delete_chunks(store, "labels", [1, 4])
    _delete_chunks(store, "tiles", [2])
    one_line_error(invoke("stitch", store, "-o", tmp_path / "s.geojson"), 2, "labels of 2 tiles are missing",
                   "nucli segment")
    # the same `segment` command (on the slide) writes the lost tile again, segments the lost ones, and
    # gives the reference output
    r = invoke("segment", he_png, "-o", out, *SEG, "--overwrite", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["tiles_segmented_now"] == 2
    assert out.read_bytes() == ref.read_bytes()


def test_deleted_tile_pixels_are_named_when_segmenting_a_store(segmented, tmp_path):
    _, store = copy_run(segmented, tmp_path)
    _delete_chunks(store, "tiles", [0, 3])
    one_line_error(invoke("stitch", store, "-o", tmp_path / "s.geojson"), 2, "tiles of 2 tiles are missing",
                   "nucli tile")
    r = invoke("segment", store, "--method", "watershed", "-o", tmp_path / "t.geojson", "--overwrite")
    one_line_error(r, 2, "pixels of 2 tiles are missing", "nucli tile")


def test_a_deleted_tile_table_is_a_one_line_error(segmented, tmp_path):
    _, store = copy_run(segmented, tmp_path)
    _delete_chunks(store, "origin", [0])
    one_line_error(invoke("stitch", store, "-o", tmp_path / "s.geojson"), 2, "tile table 'origin' is missing",
                   "--overwrite")


def test_tiling_rewrites_deleted_tiles(jpeg_svs, tmp_path):
    out = tmp_path / "run.zarr"
    assert invoke("tile", jpeg_svs, "-o", out, *FAST).exit_code == 0
    before = np.asarray(RunStore.open(out).array("tiles")[:])
    _delete_chunks(out, "tiles", [0, 2])
    r = invoke("tile", jpeg_svs, "-o", out, *FAST, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["tiles_written"] == 2
    np.testing.assert_array_equal(np.asarray(RunStore.open(out).array("tiles")[:]), before)


# ====================================================================== weights
def _tiny_gensegnet(path: Path, method: str = "gensegnet") -> Path:
    from test_gensegnet import _tiny_weights

    return _tiny_weights(path, method=method)


def test_missing_weights(he_png, tmp_path):
    r = invoke("segment", he_png, "-o", tmp_path / "o.geojson", "--method", "gensegnet", "--weights",
               tmp_path / "none.safetensors")
    one_line_error(r, 2, "weights file not found", "none.safetensors")
    assert tile_entries(tmp_path) == []


def test_truncated_weights(he_png, tmp_path):
    good = _tiny_gensegnet(tmp_path / "w")
    data = good.read_bytes()
    for keep, words in ((len(data) // 2, ["corrupt, truncated"]), (40, ["corrupt, truncated"]),
                        (5, ["empty or truncated"])):
        cut = tmp_path / "cut.safetensors"
        cut.write_bytes(data[:keep])
        r = invoke("segment", he_png, "-o", tmp_path / "o.geojson", "--method", "gensegnet", "--weights", cut)
        one_line_error(r, 2, "cut.safetensors", *words)
        assert not (tmp_path / "o.geojson").exists() and not (tmp_path / "o.nucli.zarr").exists()


def test_weights_of_another_method_on_the_command_line(he_png, tmp_path):
    other = _tiny_gensegnet(tmp_path, method="harunet")
    r = invoke("segment", he_png, "-o", tmp_path / "o.geojson", "--method", "gensegnet", "--weights", other)
    one_line_error(r, 2, "holds weights for method 'harunet'", "--method harunet")


def test_a_pickle_renamed_safetensors_is_refused(he_png, tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(3)}, path)
    r = invoke("segment", he_png, "-o", tmp_path / "o.geojson", "--method", "gensegnet", "--weights", path)
    one_line_error(r, 2, "model.safetensors", "nucli never loads pickles")


class _Payload:
    """Unpickling this would create ``marker`` (as any code in a pickle could)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_is_never_executed(he_png, tmp_path):
    from nucli.errors import WeightsError
    from nucli.models.registry import build_method
    from nucli.models.weights_io import load_weights

    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    for name in ("evil.pt", "evil.safetensors", "evil.pth"):
        if name != "evil.pt":
            shutil.copy(evil, tmp_path / name)
        r = invoke("segment", he_png, "-o", tmp_path / "o.geojson", "--method", "gensegnet", "--weights",
                   tmp_path / name)
        one_line_error(r, 2, name, "never loads pickles")
        for call in (lambda: load_weights(tmp_path / name, "gensegnet"),
                     lambda: build_method("harunet", weights=tmp_path / name)):
            with pytest.raises(WeightsError):
                call()
        r = invoke("enhance", he_png, "--weights", tmp_path / name, "-o", tmp_path / "e.png")
        assert r.exit_code == 2 and "Traceback" not in r.output
    assert not marker.exists()
    # the payload is real: unpickling (which nucli never does) would have created the file
    pickle.loads(evil.read_bytes())["state_dict"].close()
    assert marker.exists()


def test_a_weights_config_that_is_not_an_object(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from nucli.errors import WeightsError
    from nucli.models.registry import build_method

    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"nucli.method": "gensegnet", "nucli.config": "[1, 2]",
                                                          "nucli.format": "1"})
    with pytest.raises(WeightsError, match="not a JSON object"):
        build_method("gensegnet", weights=path)


# ====================================================================== evaluate
@pytest.mark.parametrize("text, words", [
    ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ('{"type": "Polygon", "coordinates": [[[0, 0], [1e300, 0], [0, 1e300], [0, 0]]]}', ["coordinates beyond"]),
    ('{"type": "Polygon", "coordinates": [[[0, 0], [2e9, 0], [0, 2e9], [0, 0]]]}', ["too large to rasterise"]),
])
def test_huge_or_absurd_geojson(tmp_path, text, words):
    (tmp_path / "pred.geojson").write_text(text)
    (tmp_path / "gt.geojson").write_text(text)
    t0 = time.perf_counter()
    r = invoke("evaluate", tmp_path / "pred.geojson", tmp_path / "gt.geojson")
    one_line_error(r, 2, *words)
    assert time.perf_counter() - t0 < 20


def test_a_geojson_with_many_features_is_scored(tmp_path):
    """20,000 small squares (a few MB): read, rasterised and scored against themselves."""
    feats = []
    for k in range(20_000):
        x, y = (k % 200) * 10, (k // 200) * 10
        ring = [[x, y], [x + 8, y], [x + 8, y + 8], [x, y + 8], [x, y]]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}})
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    r = invoke("evaluate", tmp_path / "a.geojson", tmp_path / "a.geojson", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["aggregate"]
    assert report["n_true"] == 20_000 and report["mean_over_images"]["aji"] == 1.0


# ====================================================================== environment
def test_outputs_that_cannot_be_written(segmented, he_png, tmp_path):
    _, ref, store = segmented
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    from test_train import _write_dataset

    data = _write_dataset(tmp_path / "data", n=1, size=32)
    cases = [
        ("segment", he_png, "-o", blocker / "o.geojson", *SEG),
        ("segment", he_png, "-o", "/proc/nucli-test/o.geojson", *SEG),
        ("stitch", store, "-o", blocker / "o.geojson"),
        ("stitch", store, "-o", "/proc/nucli-test/o.geojson"),
        ("evaluate", ref, ref, "-o", blocker / "report.json"),
        ("train", "--data", data, "-o", blocker / "run"),
        ("train", "--data", data, "-o", "/proc/nucli-test/run"),
    ]
    for args in cases:
        r = invoke(*args)
        where = "/proc/nucli-test" if "/proc" in " ".join(map(str, args)) else "file.txt"
        one_line_error(r, 2, "cannot", where)
        if where == "file.txt":
            assert "is a file, not a folder" in r.stderr or "Not a directory" in r.stderr, r.stderr
    assert blocker.read_text() == "x" and tile_entries(tmp_path) == ["data", "file.txt"]


@pytest.mark.parametrize("fmt", ["geojson", "csv", "geojson.gz"])
def test_disk_full_during_export_keeps_the_previous_output(segmented, tmp_path, monkeypatch, fmt):
    """ENOSPC in the middle of writing: exit 2 naming the error; the old file is untouched, no temp file is left."""
    from nucli.export import _atomic

    _, _, store = segmented
    out = tmp_path / f"n.{fmt}"
    r = invoke("stitch", store, "-o", out)
    assert r.exit_code == 0, r.output
    before = out.read_bytes()

    class FullDisk(io.BufferedWriter):
        room = 4096  # the disk fills after 4 KiB

        def write(self, data):
            if FullDisk.room < len(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            FullDisk.room -= len(data)
            return super().write(data)

    monkeypatch.setattr(_atomic, "open", lambda path, mode: FullDisk(io.FileIO(path, mode.replace("b", ""))),
                        raising=False)
    r = invoke("stitch", store, "-o", out, "--overwrite", "--quiet")
    one_line_error(r, 2, "No space left on device")
    assert out.read_bytes() == before
    assert tile_entries(tmp_path) == [out.name]


def test_disk_full_while_tiling_then_rerun_completes(jpeg_svs, tmp_path, monkeypatch):
    out = tmp_path / "run.zarr"
    real = RunStore.write
    calls = {"n": 0}

    def full(self, name, i, value):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, i, value)

    monkeypatch.setattr(RunStore, "write", full)
    one_line_error(invoke("tile", jpeg_svs, "-o", out, *FAST), 2, "No space left on device")
    monkeypatch.setattr(RunStore, "write", real)
    r = invoke("tile", jpeg_svs, "-o", out, *FAST, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "resumed"
    assert RunStore.open(out).is_complete("tile")


# ====================================================================== interruptions
SLOW_RUN = """
import importlib, sys, time
module, owner, name, delay = sys.argv[1:5]
del sys.argv[1:5]
target = importlib.import_module(module)
if owner != "-":
    target = getattr(target, owner)
real = getattr(target, name)

def slow(*args, **kwargs):
    sys.stderr.write("@progress\\n")
    sys.stderr.flush()
    time.sleep(float(delay))
    return real(*args, **kwargs)

setattr(target, name, slow)
from nucli.cli import app
app(prog_name="nucli")
"""


def _sigint_default() -> None:
    """Children get Ctrl-C's default action even when this run was started with SIGINT ignored
    (a background job of a non-interactive shell, e.g. CI): Python then raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def nucli_slowed(slow: tuple[str, str, str, float], *args) -> subprocess.Popen:
    """``nucli ARGS`` in a subprocess, with ``slow`` (module, class or '-', function, seconds) delayed per call
    and announced on stderr with a '@progress' line."""
    cmd = [sys.executable, "-c", SLOW_RUN, *map(str, slow), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_default)


def interrupt_after(proc: subprocess.Popen, marks: int) -> tuple[int, str]:
    """Send SIGINT once ``marks`` progress lines were printed; (exit code, the rest of stderr)."""
    seen, lines = 0, []
    deadline = time.time() + 120
    while seen < marks and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        seen += line.startswith("@progress")
    assert seen == marks, "".join(lines)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, " ".join((err + "".join(lines)).replace("@progress", "").split())


def test_sigint_during_tile_then_rerun(jpeg_svs, tmp_path):
    ref = tmp_path / "ref.zarr"
    assert invoke("tile", jpeg_svs, "-o", ref, *FAST).exit_code == 0
    out = tmp_path / "run.zarr"
    rc, err = interrupt_after(nucli_slowed(("nucli.tiling.store", "RunStore", "write", 0.3), "tile", jpeg_svs,
                                           "-o", out, *FAST), 3)
    assert rc == 130 and "Interrupted" in err and "rerun the same command to resume" in err
    done = RunStore.open(out).done("tile")
    assert 0 < done.sum() < done.size
    r = invoke("tile", jpeg_svs, "-o", out, *FAST, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "resumed"
    a, b = RunStore.open(ref), RunStore.open(out)
    np.testing.assert_array_equal(np.asarray(a.array("tiles")[:]), np.asarray(b.array("tiles")[:]))
    np.testing.assert_array_equal(a.indices(), b.indices())


def test_sigint_during_segment_then_rerun(segmented, he_png, tmp_path):
    _, ref, _ = segmented
    out = tmp_path / "n.geojson"
    rc, err = interrupt_after(nucli_slowed(("nucli.pipeline", "-", "write_tile_result", 0.3), "segment", he_png,
                                           "-o", out, *SEG, "--batch-size", "1"), 2)
    assert rc == 130 and "rerun the same command to resume" in err
    assert not out.exists()
    done = RunStore.open(tmp_path / "n.nucli.zarr").done("segment")
    assert 0 < done.sum() < done.size
    r = invoke("segment", he_png, "-o", out, *SEG, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["tiles_segmented_now"] == int((~done).sum())
    assert out.read_bytes() == ref.read_bytes()


def test_sigint_during_stitch_then_rerun(segmented, tmp_path):
    _, ref, store = segmented
    out = tmp_path / "n.geojson"
    rc, err = interrupt_after(nucli_slowed(("nucli.stitching", "-", "tile_nuclei", 0.3), "stitch", store, "-o", out,
                                           "-f", "csv", "--quiet"), 2)
    assert rc == 130 and "rerun the same command" in err
    assert tile_entries(tmp_path) == []  # no output and no temporary file
    r = invoke("stitch", store, "-o", out, "-f", "csv", "--quiet")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == ref.read_bytes()


def test_sigint_during_enhance_then_rerun(he_png, tmp_path):
    from nucli.models.gensegnet.enhance import ARRAY, STAGE
    from nucli.models.registry import get_spec

    if not get_spec("gensegnet").weights_path.exists():
        pytest.skip("gensegnet weights are not installed")
    tile_args = ["--mpp", "0.5", "--tile-size", "256", "--overlap", "32", "--quiet"]
    ref, run = tmp_path / "ref.zarr", tmp_path / "run.zarr"
    for store in (ref, run):
        assert invoke("tile", he_png, "-o", store, *tile_args).exit_code == 0
    assert invoke("enhance", ref, "--quiet").exit_code == 0
    rc, err = interrupt_after(nucli_slowed(("nucli.enhance_stage", "EnhanceJob", "finish", 0.3),
                                           "enhance", run, "--batch-size", "1", "--quiet"), 2)
    assert rc == 130 and "rerun the same command to resume" in err
    done = RunStore.open(run).done(STAGE)
    assert 0 < done.sum() < done.size
    r = invoke("enhance", run, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["tiles_enhanced"] == int((~done).sum())
    a, b = RunStore.open(ref), RunStore.open(run)
    for i in range(a.n_tiles):
        np.testing.assert_array_equal(a.read(ARRAY, i), b.read(ARRAY, i))


def test_sigint_during_evaluate_then_rerun(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    for k in range(6):
        lab = blob_labels(120, 100, 8, seed=k, r=(5, 8), touching_pairs=0).astype(np.uint16)
        tifffile.imwrite(gt / f"im{k}.tif", lab)
        tifffile.imwrite(pred / f"im{k}.tif", np.roll(lab, k, axis=1))
    ref = tmp_path / "ref.json"
    assert invoke("evaluate", pred, gt, "-o", ref, "--quiet").exit_code == 0
    out = tmp_path / "report.json"
    rc, err = interrupt_after(nucli_slowed(("nucli.evaluation.runner", "-", "score_image", 0.3), "evaluate", pred, gt,
                                           "-o", out, "--quiet"), 2)
    assert rc == 130 and "Interrupted. No report was written; rerun the same command" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert invoke("evaluate", pred, gt, "-o", out, "--quiet").exit_code == 0
    assert json.loads(out.read_text()) == json.loads(ref.read_text())


TINY_TRAIN = """
import sys
from nucli.training import gensegnet as g
g.PRESETS["cpu"] = {
    "generator": {"channels": 4, "n_down": 2, "n_blocks": 1, "max_channels": 8, "input_skip": True},
    "discriminator": {"dim": 32, "patch": 8, "base_size": 64, "heads": 2, "window": 4},
    "unet": {"widths": [4, 8, 16]},
    "crop": 64, "batch": 2, "epochs": 55,
    "gan": {"lr": 4e-4, "lam": 0.01},
    "unet_train": {"lr": 1e-3, "epochs": 2},
    "finetune": {"lr": 2e-4, "epochs": 1},
}
from nucli.cli import app
app(prog_name="nucli")
"""


def _wait_for_checkpoint(proc: subprocess.Popen, ckpt: Path, step: int) -> None:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(ckpt.read_text())["meta"]["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} (exit {proc.poll()}): {proc.stderr.read() if proc.stderr else ''}")


def test_train_sigint_and_sigkill_then_resume_from_the_last_checkpoint(tmp_path):
    """110 GAN steps (checkpoints every 50): Ctrl-C after the first (which checkpoints the step it stops at),
    SIGKILL after step 100, then --resume finishes; each resumed run starts at its checkpoint."""
    pytest.importorskip("torch")
    from test_train import _write_dataset

    data = _write_dataset(tmp_path / "data", n=4, size=64)
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", TINY_TRAIN, "train", "--data", str(data), "-o", str(out), "--no-finetune",
           "--threads", "1", "--quiet"]
    ckpt = out / "gan.ckpt.json"
    logged = lambda: [r["step"] for r in map(json.loads, (out / "gan.log.jsonl").read_text().splitlines())  # noqa: E731
                      if "l1" in r]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_default)
    _wait_for_checkpoint(proc, ckpt, 50)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = " ".join(err.split())
    assert proc.returncode == 130 and "Interrupted" in err and "--resume" in err, err
    again = subprocess.run(cmd, capture_output=True, text=True)  # without --resume: refused, nothing lost
    assert again.returncode == 2 and "--resume" in again.stderr
    # Ctrl-C finished the step under way and checkpointed it: no completed step is lost
    stopped = json.loads(ckpt.read_text())["meta"]["step"]
    assert 50 <= stopped < 110
    assert logged()[0] == 10

    n = len(logged())
    proc = subprocess.Popen([*cmd, "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, ckpt, 100)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert logged()[n] == (stopped // 10 + 1) * 10  # continued after the step Ctrl-C stopped at

    n = len(logged())
    final = subprocess.run([*cmd, "--resume", "--json"], capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert (out / "gensegnet_cpu.safetensors").exists()
    assert logged()[n:] == [110]  # continued after the checkpoint at step 100
    summary = json.loads((out / "gensegnet_cpu.json").read_text())
    assert summary["stages"]["gan"]["steps"] == 110


# ====================================================================== determinism
def test_same_input_gives_byte_identical_geojson_with_the_same_ids(segmented, he_png, tmp_path):
    _, ref, _ = segmented
    copy = tmp_path / "elsewhere" / "renamed.png"
    copy.parent.mkdir()
    shutil.copy(he_png, copy)
    out = tmp_path / "again.geojson"
    r = invoke("segment", copy, "-o", out, *SEG, "--batch-size", "3")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == ref.read_bytes()
    ids = [f["id"] for f in json.loads(ref.read_text())["features"]]
    assert len(ids) == len(set(ids)) > 50
    assert all(uuid.UUID(i).version == 5 for i in ids)
    # ids depend on the slide's content: another slide gives other ids
    from PIL import Image

    other = write_png(tmp_path / "other.png", np.ascontiguousarray(np.asarray(Image.open(he_png))[::-1]))
    r = invoke("segment", other, "-o", tmp_path / "other.geojson", *SEG)
    assert r.exit_code == 0, r.output
    assert not set(ids) & {f["id"] for f in json.loads((tmp_path / "other.geojson").read_text())["features"]}


# ====================================================================== the table itself
def test_every_row_of_the_reliability_table_names_existing_tests_and_the_readme_counts_them():
    import re

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "reliability.md").read_text(encoding="utf-8")
    rows = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith("| ---")
            and not line.split("|")[1].strip() in ("Bad input", "Fault", "Reader")]
    for row in rows:
        refs = re.findall(r"`(test_\w+\.py)::(\w+)(?:\[([^\]]+)\])?`", row)
        assert refs, row
        for file, name, param in refs:
            text = (root / "tests" / file).read_text(encoding="utf-8")
            assert f"def {name}(" in text and (not param or param in text), (file, name, param)
    assert f"**{len(rows)} bad inputs and faults** are tried" in doc
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    assert f"{len(rows)} bad inputs and faults are tried" in section and "docs/reliability.md" in section


def test_enhance_png_outputs_are_checked_before_work_and_replace_only_nucli_files(he_png, tmp_path):
    from nucli.models.registry import get_spec

    if not get_spec("gensegnet").weights_path.exists():
        pytest.skip("gensegnet weights are not installed")
    # an image: --png FOLDER writes <image>_enhanced.png there, carrying nucli's marker
    folder = tmp_path / "pngs"
    folder.mkdir()
    r = invoke("enhance", he_png, "--png", folder, "--quiet")
    assert r.exit_code == 0, r.output
    out = folder / f"{Path(he_png).stem}_enhanced.png"
    first = out.read_bytes()
    one_line_error(invoke("enhance", he_png, "--png", folder), 2, "already exists", "--overwrite")
    assert invoke("enhance", he_png, "--png", folder, "--overwrite", "--quiet").exit_code == 0
    assert out.read_bytes() == first
    # a user's own PNG of that name is never replaced, --overwrite or not
    user = tmp_path / "mine.png"
    write_png(user, np.zeros((8, 8, 3), np.uint8))
    before = user.read_bytes()
    one_line_error(invoke("enhance", he_png, "-o", user, "--overwrite"), 2, "refusing to replace")
    assert user.read_bytes() == before
    one_line_error(invoke("enhance", he_png, "-o", tmp_path / "a.png", "--png", folder), 1, "-o and --png")
    # a run store: --png naming a file, and a folder holding a user's tile_0000_0000.png
    run = tmp_path / "run.zarr"
    assert invoke("tile", he_png, "-o", run, "--mpp", "0.5", "--tile-size", "256", "--overlap", "32",
                  "--quiet").exit_code == 0
    one_line_error(invoke("enhance", run, "--png", user), 2, "is a file")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    write_png(tiles / "tile_0000_0000.png", np.zeros((8, 8, 3), np.uint8))
    one_line_error(invoke("enhance", run, "--png", tiles, "--overwrite"), 2, "refusing to replace")
    assert not RunStore.open(run).done("enhance").any()  # refused before any tile was enhanced
