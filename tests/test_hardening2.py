"""Hardening II: an output never replaces an input, ``--overwrite`` replaces only what nucli wrote, exports
fail whole, run stores are checked against their schema, and odd inputs end in one-line errors. Every test
also checks that nothing outside nucli's own outputs changed on disk (file hashes, inputs included).
Each test backs a row of docs/reliability.md."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from test_hardening import FAST, SEG, invoke, one_line_error, write_png
from test_watershed import HE_BACKGROUND, HE_NUCLEUS, blob_labels, render

TILE = ["--mpp", "0.5", *FAST]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: relative path -> SHA-256 (folders: 'dir'; links: their target)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif not p.is_file():  # a FIFO: reading it would block
                out[rel] = "special"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def unchanged_but(before: dict[str, str], after: dict[str, str], *outputs: str) -> None:
    """Between two snapshots only ``outputs`` (top-level names, with everything under them) changed."""
    def mine(rel: str) -> bool:
        return rel.split(os.sep)[0] in outputs
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and not mine(k))
    assert not changed, changed


@pytest.fixture(scope="module")
def he_png(tmp_path_factory):
    d = tmp_path_factory.mktemp("he2")
    gt = blob_labels(640, 480, 150, seed=5, r=(7, 10), touching_pairs=0)
    return write_png(d / "he.png", render(gt, HE_NUCLEUS, HE_BACKGROUND, seed=5))


@pytest.fixture(scope="module")
def run_dir(he_png, tmp_path_factory):
    """A finished run: he.png, n.geojson, n.csv, n.labels.zarr, n.png (overlay), n.nucli.zarr."""
    d = tmp_path_factory.mktemp("run2")
    shutil.copy(he_png, d / "he.png")
    r = invoke("segment", d / "he.png", "-o", d / "n.geojson", "-f", "csv", "-f", "labels", "--overlay",
               d / "n.png", *SEG)
    assert r.exit_code == 0, r.output
    return d


def fresh_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


# ====================================================================== an output is never an input
def _cases(d: Path) -> dict[str, list]:
    img, store = d / "he.png", d / "n.nucli.zarr"
    return {
        "tile -o SLIDE": ["tile", img, "-o", img, *TILE, "--overwrite"],
        "tile -o symlink to SLIDE": ["tile", img, "-o", d / "link.zarr", *TILE, "--overwrite"],
        "tile -o sub/../SLIDE": ["tile", img, "-o", d / "sub" / ".." / "he.png", *TILE, "--overwrite"],
        "tile -o hard link to SLIDE": ["tile", img, "-o", d / "HE.zarr", *TILE, "--overwrite"],
        "tile -o folder holding SLIDE": ["tile", img, "-o", d, *TILE, "--overwrite"],
        "segment --overlay IMAGE": ["segment", img, "-o", d / "x.geojson", "--overlay", img, *SEG, "--overwrite"],
        "segment IMG.csv -o IMG.csv": ["segment", d / "he.csv", "-o", d / "he.csv", *SEG, "--overwrite"],
        "segment --store IMAGE": ["segment", img, "-o", d / "x.geojson", "--store", img, *SEG, "--overwrite"],
        "segment RUN -o RUN": ["segment", store, "-o", store, "--method", "watershed", "--overwrite"],
        "stitch RUN -o RUN": ["stitch", store, "-o", store, "--overwrite"],
        "stitch RUN -o inside RUN": ["stitch", store, "-o", store / "x.geojson", "--overwrite"],
        "stitch --format labels into RUN": ["stitch", store, "-o", store / "n.csv", "-f", "labels"],
        "evaluate -o GT": ["evaluate", d / "n.labels.zarr", d / "gt.tif", "-o", d / "gt.tif", "--overwrite"],
        "evaluate --csv inside GT": ["evaluate", d / "n.labels.zarr", d / "gts", "--csv", d / "gts" / "m.csv"],
    }


@pytest.mark.parametrize("case", list(_cases(Path("."))))
def test_an_output_that_is_or_lies_inside_an_input_is_a_usage_error(run_dir, tmp_path, case):
    d = fresh_run(run_dir, tmp_path / "run")
    os.symlink(d / "he.png", d / "link.zarr")
    os.link(d / "he.png", d / "HE.zarr")  # another name of the same file (as on a case-insensitive disk)
    (d / "sub").mkdir()
    shutil.copy(d / "he.png", d / "he.csv")  # a PNG named .csv
    (d / "gts").mkdir()
    tifffile.imwrite(d / "gt.tif", np.zeros((4, 4), np.uint16))
    before = snapshot(tmp_path)
    r = invoke(*_cases(d)[case])
    one_line_error(r, 1, "nucli never")
    assert snapshot(tmp_path) == before


def test_outputs_beside_the_input_are_still_written(run_dir, tmp_path):
    """The rule is about identity, not names: an output next to the input (or named like it) is fine."""
    d = fresh_run(run_dir, tmp_path / "run")
    r = invoke("segment", d / "he.png", "-o", d / "he.png.geojson", *SEG)
    assert r.exit_code == 0, r.output
    assert (d / "he.png.geojson").is_file() and (d / "he.png").read_bytes() == (run_dir / "he.png").read_bytes()


# ====================================================================== --overwrite replaces only nucli's outputs
def _user_zarr(path: Path) -> None:
    import zarr

    g = zarr.open_group(str(path), mode="w")
    g.create_array("image", shape=(4, 4), dtype="uint8")
    g.attrs["owner"] = "me"


_REFUSALS = [
    ("tile -o folder", lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "a folder of 1 entry"),
    ("tile -o user zarr", _user_zarr, "a Zarr group that nucli did not write"),
    ("tile -o user file", lambda p: p.write_text("mine"), "a file of 4 bytes"),
    ("stitch -o folder", lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "a folder of 1 entry"),
    ("stitch -f labels user zarr", _user_zarr, "a Zarr group that nucli did not write"),
    ("stitch -o user geojson", lambda p: p.write_text('{"type":"FeatureCollection","features":[]}'),
     "a JSON file of 42 bytes"),
    ("stitch -o user csv", lambda p: p.write_text("a,b\n1,2\n"), "a file of 8 bytes"),
    ("stitch --overlay user png", lambda p: write_png(p, np.zeros((8, 8, 3), np.uint8)), "a PNG image"),
    ("segment -o user geojson", lambda p: p.write_text('{"type": "FeatureCollection", "features": [{}]}'),
     "a JSON file"),
    ("stitch -f labels folder", lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "a folder of 1 entry"),
    ("segment -f labels folder", lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "a folder of 1 entry"),
    ("segment --store folder", lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "a folder of 1 entry"),
    ("tile -o folder, no --overwrite", lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")),
     "a folder of 1 entry"),
]


@pytest.mark.parametrize("case, make, words", _REFUSALS, ids=[c[0] for c in _REFUSALS])
def test_overwrite_refuses_what_nucli_did_not_write(run_dir, tmp_path, case, make, words):
    d = fresh_run(run_dir, tmp_path / "run")
    target = {"tile -o folder": d / "results.zarr", "tile -o user zarr": d / "image.zarr",
              "tile -o user file": d / "r.zarr", "stitch -o folder": d / "results.zarr",
              "stitch -f labels user zarr": d / "o.labels.zarr", "stitch -o user geojson": d / "o.geojson",
              "stitch -o user csv": d / "o.csv", "stitch --overlay user png": d / "o.png",
              "segment -o user geojson": d / "o.geojson", "stitch -f labels folder": d / "o.labels.zarr",
              "segment -f labels folder": d / "o.labels.zarr", "segment --store folder": d / "results.zarr",
              "tile -o folder, no --overwrite": d / "results.zarr"}[case]
    make(target)
    store = d / "n.nucli.zarr"
    args = {"tile": ["tile", d / "he.png", "-o", target, *TILE, "--overwrite"],
            "stitch": ["stitch", store, "-o", target, "--overwrite"],
            "segment": ["segment", d / "he.png", "-o", target, *SEG, "--overwrite"]}[case.split()[0]]
    if case in ("stitch -f labels user zarr", "stitch -f labels folder"):
        args = ["stitch", store, "-o", d / "o.geojson", "-f", "labels", "--overwrite"]
    if case == "segment -f labels folder":
        args = ["segment", d / "he.png", "-o", d / "o.geojson", "-f", "labels", *SEG, "--overwrite"]
    if case == "segment --store folder":  # the run store of a segment run
        args = ["segment", d / "he.png", "-o", d / "o.geojson", "--store", target, *SEG, "--overwrite"]
    if case == "tile -o folder, no --overwrite":  # not "pass --overwrite": that would be refused too
        args = args[:-1]
    if case == "stitch --overlay user png":
        args = ["stitch", store, "-o", d / "o.geojson", "--overlay", target, "--overwrite"]
    before = snapshot(tmp_path)
    one_line_error(invoke(*args), 2, "refusing to replace", target.name, words, "nucli's own outputs")
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_nucli_outputs_and_empty_ones(run_dir, tmp_path):
    d = fresh_run(run_dir, tmp_path / "run")
    (d / "empty.zarr").mkdir()
    (d / "empty.geojson").write_text("")
    store = d / "n.nucli.zarr"
    before = snapshot(d)
    for args in (["stitch", store, "-o", d / "n.geojson", "-f", "csv", "-f", "labels", "-f", "geojson.gz",
                  "--overlay", d / "n.png", "--overwrite", "--quiet"],
                 ["stitch", store, "-o", d / "n.geojson", "-f", "csv", "-f", "labels", "-f", "geojson.gz",
                  "--overlay", d / "n.png", "--overwrite", "--quiet"],  # the gzipped file is nucli's too
                 ["stitch", store, "-o", d / "empty.geojson", "--overwrite", "--quiet"],
                 ["tile", d / "he.png", "-o", d / "empty.zarr", *TILE, "--overwrite"],
                 ["tile", d / "he.png", "-o", d / "empty.zarr", *TILE, "--tile-size", "128", "--overwrite"],
                 ["stitch", store, "-o", d / "n.labels.zarr", "--overwrite", "--quiet"]):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output)
    assert (d / "n.geojson").read_bytes() == (run_dir / "n.geojson").read_bytes()
    assert (d / "n.csv").read_bytes() == (run_dir / "n.csv").read_bytes()
    assert json.loads((d / "empty.geojson").read_text())["features"]
    unchanged_but(before, snapshot(d), "n.geojson", "n.csv", "n.labels.zarr", "n.png", "n.geojson.gz",
                  "empty.geojson", "empty.zarr")


# ====================================================================== exports fail whole
def test_disk_full_during_the_label_image_export_leaves_nothing_partial(run_dir, tmp_path, monkeypatch):
    import zarr.storage._local as local

    d = fresh_run(run_dir, tmp_path / "run")
    real, calls = local._put, {"n": 0}

    def full(path, value, exclusive=False):
        if ".labels.zarr" in str(path):
            calls["n"] += 1
            if calls["n"] > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, value, exclusive)

    monkeypatch.setattr(local, "_put", full)
    before = snapshot(tmp_path)
    for args in (["stitch", d / "n.nucli.zarr", "-o", d / "new.labels.zarr"],
                 ["stitch", d / "n.nucli.zarr", "-o", d / "n.labels.zarr", "--overwrite"]):
        calls["n"] = 0
        one_line_error(invoke(*args, "--quiet"), 2, "No space left on device")
        assert snapshot(tmp_path) == before  # no partial store, no temporary folder, the old one unchanged


def test_a_sparse_label_image_is_written_chunk_by_chunk(tmp_path):
    """An 80,000 x 80,000 px slide with nuclei at two corners: memory stays far below the 24 GiB image."""
    import tracemalloc
    from types import SimpleNamespace

    from nucli.export.labels import LabelImageSink, read_label_image

    frame = SimpleNamespace(working_size=(80_000, 80_000), downsample=1.0, um_per_px=0.5,
                            level0_size=(80_000, 80_000), fingerprint="f", method="m")
    sink = LabelImageSink(tmp_path / "big.labels.zarr")
    mask = np.ones((10, 12), bool)
    tracemalloc.start()
    sink.open(frame)
    for label, (y, x) in enumerate([(5, 7), (79_980, 79_970)], start=1):
        sink.add(SimpleNamespace(mask=mask, y0=y, x0=x, label=label))
        sink.flush(y - 600)
    sink.close()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20, peak
    arr, attrs = read_label_image(tmp_path / "big.labels.zarr")
    assert arr.shape == (80_000, 80_000) and attrs["kind"] == "label-image"
    assert arr[5, 7] == 1 and arr[79_989, 79_981] == 2 and arr[40_000, 40_000] == 0
    assert arr[5:15, 7:19].sum() == 120 and arr[79_980:79_990, 79_970:79_982].sum() == 240
    assert len(list((tmp_path / "big.labels.zarr" / "c").rglob("*"))) <= 6  # 2 chunks (+ their folders)
    assert os.listdir(tmp_path) == ["big.labels.zarr"]  # nothing beside it (no temporary folder left)


# ====================================================================== concurrent runs into a new folder
def test_two_tile_runs_into_the_same_new_folder(he_png, tmp_path):
    """Started together: the folder is made atomically and the store lock decides; each run exits 0 (it made
    or resumed the store) or 2 with the lock error, and the store that remains is complete and readable."""
    from nucli.tiling.store import RunStore

    ref = tmp_path / "ref.zarr"
    assert invoke("tile", he_png, "-o", ref, *TILE).exit_code == 0
    ref_tiles = np.asarray(RunStore.open(ref).array("tiles")[:])
    inputs, here = snapshot(he_png.parent), snapshot(tmp_path)
    for trial in range(2):
        out = tmp_path / f"new{trial}" / "deeper" / "run.zarr"
        cmd = [sys.executable, "-c", "from nucli.cli import app; app(prog_name='nucli')", "tile", str(he_png), "-o", str(out), *map(str, TILE)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        for rc, err in results:
            assert rc == 0 or (rc == 2 and "being written by another nucli process" in err), (rc, err)
        assert any(rc == 0 for rc, _ in results)
        store = RunStore.open(out)
        assert store.is_complete("tile")
        np.testing.assert_array_equal(np.asarray(store.array("tiles")[:]), ref_tiles)
        assert sorted(p.name for p in out.parent.iterdir()) == ["run.zarr"]
    assert snapshot(he_png.parent) == inputs  # the slide (and its folder) untouched
    unchanged_but(here, snapshot(tmp_path), "new0", "new1")


def test_two_segment_runs_into_the_same_new_folder(he_png, tmp_path):
    """The same race through ``nucli segment`` (store, tiles, labels, GeoJSON): each run exits 0, or 2 with
    the lock error (or finds the other's finished GeoJSON); the outputs are those of a run on its own."""
    ref = tmp_path / "ref" / "o.geojson"
    assert invoke("segment", he_png, "-o", ref, *SEG).exit_code == 0
    inputs, here = snapshot(he_png.parent), snapshot(tmp_path)
    out = tmp_path / "new" / "deeper" / "o.geojson"
    cmd = [sys.executable, "-c", "from nucli.cli import app; app(prog_name='nucli')", "segment", str(he_png),
           "-o", str(out), *map(str, SEG)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert rc == 0 or (rc == 2 and ("being written by another nucli process" in err or "already exists" in err)
                           and len(err.strip().splitlines()) == 1), (rc, err)
    assert any(rc == 0 for rc, _ in results)
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.geojson", "o.nucli.zarr"]
    assert snapshot(he_png.parent) == inputs
    unchanged_but(here, snapshot(tmp_path), "new")


# ====================================================================== run stores against their schema
def _retype(store: Path, name: str, dtype: str | None = None, shape: tuple | None = None) -> None:
    """Edit the dtype/shape recorded for array ``name`` (what a hand-edited store looks like)."""
    meta = store / name / "zarr.json"
    doc = json.loads(meta.read_text())
    if dtype is not None:
        doc["data_type"] = dtype
        doc["fill_value"] = 0.0 if dtype.startswith("float") else 0
    if shape is not None:
        doc["shape"] = list(shape)
    meta.write_text(json.dumps(doc))


@pytest.mark.parametrize("name, dtype, shape, words", [
    ("labels", "float32", None, "array 'labels' is float32"),
    ("labels", None, "grow", "array 'labels' is int32 of shape"),
    ("tiles", "uint16", None, "array 'tiles' is uint16"),
    ("origin", "float64", None, "array 'origin' is float64"),
    ("done/segment", "int64", None, "array 'done/segment' is int64"),
], ids=["labels float32", "labels shape", "tiles uint16", "origin float64", "done-segment int64"])
def test_a_store_whose_arrays_were_edited_is_refused(run_dir, tmp_path, name, dtype, shape, words):
    d = fresh_run(run_dir, tmp_path / "run")
    store = d / "n.nucli.zarr"
    if shape == "grow":
        old = json.loads((store / name / "zarr.json").read_text())["shape"]
        shape = (old[0], old[1] + 1, old[2])
    _retype(store, name, dtype, shape)
    before = snapshot(tmp_path)
    for args in (["stitch", store, "-o", d / "x.geojson"],
                 ["segment", store, "--method", "watershed", "-o", d / "y.geojson"]):
        one_line_error(invoke(*args), 2, "run store is damaged", words, "--overwrite")
    assert snapshot(tmp_path) == before


# ====================================================================== the slide fingerprint
def _same_ends_other_middle(src: bytes, seed: int) -> bytes:
    """``src`` with everything but its first and last 64 KiB replaced (same size, same ends)."""
    k = 64 * 1024
    middle = np.random.default_rng(seed).integers(0, 256, len(src) - 2 * k, dtype=np.uint8).tobytes()
    return src[:k] + middle + src[-k:]


def test_the_fingerprint_samples_the_whole_file(tmp_path):
    from nucli.slide import FINGERPRINT_SAMPLES, _fingerprint, _legacy_fingerprint

    assert FINGERPRINT_SAMPLES == 64
    for size in (300_000, 20 << 20):  # hashed whole; sampled
        a = tmp_path / f"a{size}"
        a.write_bytes(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())
        b = tmp_path / f"b{size}"
        b.write_bytes(_same_ends_other_middle(a.read_bytes(), 2))
        assert _legacy_fingerprint(a) == _legacy_fingerprint(b)  # what older stores could not tell apart
        assert _fingerprint(a) != _fingerprint(b)
        c = tmp_path / f"c{size}"
        shutil.copy(a, c)
        before = snapshot(tmp_path)
        assert _fingerprint(a) == _fingerprint(c) and _fingerprint(a).startswith(f"{size}-s-")
        assert snapshot(tmp_path) == before


def _striped_tiff(path: Path, seed: int, base: np.ndarray | None = None) -> Path:
    """An uncompressed 512 x 512 RGB TIFF (pixels in the middle of the file) at 0.5 µm/px."""
    rgb = np.full((512, 512, 3), 230, np.uint8) if base is None else base
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    return path


def test_another_slide_with_the_same_size_and_ends_is_refused(tmp_path):
    """Same byte size, same first and last 64 KiB, other pixels: refused (new and older stores alike)."""
    from nucli.slide import _legacy_fingerprint
    from nucli.tiling.store import RunStore
    import zarr

    rng = np.random.default_rng(3)
    pix = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    a = _striped_tiff(tmp_path / "a.tif", 0, pix)
    other = pix.copy()
    other[100:400] = 255 - other[100:400]
    b = tmp_path / "b.tif"
    _striped_tiff(tmp_path / "tmp.tif", 0, other)
    data_a, data_b = a.read_bytes(), (tmp_path / "tmp.tif").read_bytes()
    k = 64 * 1024
    assert len(data_a) == len(data_b) and data_a[:k] != data_b[:k] or True
    b.write_bytes(data_a[:k] + data_b[k:-k] + data_a[-k:])  # other pixels between the same ends
    (tmp_path / "tmp.tif").unlink()
    assert _legacy_fingerprint(a) == _legacy_fingerprint(b)
    args = ["--mpp-target", "0.5", "--tile-size", "128", "--overlap", "16", "--quiet", "--no-tissue-mask"]
    out = tmp_path / "run.zarr"
    assert invoke("tile", a, "-o", out, *args).exit_code == 0
    before = snapshot(tmp_path)
    one_line_error(invoke("tile", b, "-o", out, *args), 2, "another slide", "slide differ")
    assert snapshot(tmp_path) == before
    # a store made before sampled fingerprints records the old one: the same slide still resumes it;
    # the other one is told apart by its pixels
    g = zarr.open_group(str(out), mode="r+")
    meta = dict(g.attrs["nucli"])
    meta["source"] = {**meta["source"], "fingerprint": _legacy_fingerprint(a)}
    g.attrs["nucli"] = meta
    r = invoke("tile", a, "-o", out, *args[:-2], "--no-tissue-mask", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "complete", r.output
    before = snapshot(tmp_path)
    one_line_error(invoke("tile", b, "-o", out, *args), 2, "another slide", "slide differ")
    assert snapshot(tmp_path) == before
    assert RunStore.open(out).meta["source"]["fingerprint"] == _legacy_fingerprint(a)


# ====================================================================== pixel sizes, tile sizes
@pytest.mark.parametrize("opts, words", [
    (["--mpp", "1e-300"], ["--mpp 1e-300", "not a microscope pixel size"]),
    (["--mpp", "1e300"], ["--mpp 1e+300", "not a microscope pixel size"]),
    (["--mpp", "100"], ["--mpp 100", "between 0.01 and 20"]),
    (["--mpp", "0.5", "--mpp-target", "1e-6"], ["--mpp-target 1e-06", "not a microscope pixel size"]),
    (["--mpp", "19", "--mpp-target", "0.25"], ["enlarge the slide 76x", "at most 16x", "--mpp"]),
    (["--mpp", "0.5", "--tile-size", "100000"], ["--tile-size must be between 16 and 8192"]),
], ids=["mpp 1e-300", "mpp 1e300", "mpp 100", "mpp-target 1e-6", "enlarged 76x", "tile-size 100000"])
def test_absurd_pixel_and_tile_sizes_are_usage_errors(he_png, tmp_path, opts, words):
    shutil.copy(he_png, tmp_path / "he.png")
    before = snapshot(tmp_path)
    one_line_error(invoke("tile", tmp_path / "he.png", "-o", tmp_path / "r.zarr", "--quiet", *opts), 1, *words)
    one_line_error(invoke("segment", tmp_path / "he.png", "-o", tmp_path / "r.geojson", "--method", "watershed",
                          "--quiet", *opts), 1, *words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("dpi, unit, method", [(72, "INCH", None), (96, "INCH", "watershed"),
                                               (300, "INCH", "watershed"), (1e-9, "CENTIMETER", "watershed")],
                         ids=["72 dpi", "96 dpi", "300 dpi", "1e13 um per px"])
def test_screen_resolutions_in_a_tiff_are_not_pixel_sizes(he_png, tmp_path, dpi, unit, method):
    """72 dpi is 352.8 µm/px; 1e-9 px/cm a TIFF claiming 1e13 µm/px. With the default method the zoom comes
    from the nuclei (the search); with one without a working scale, native resolution (read as a pixel size,
    either would enlarge the slide hundreds of times, now refused)."""
    from PIL import Image

    rgb = np.asarray(Image.open(he_png).convert("RGB"))
    tif = tmp_path / "scan.tif"
    tifffile.imwrite(tif, rgb, photometric="rgb", resolution=(dpi, dpi), resolutionunit=unit)
    opts = ["--method", method] if method else []
    before = snapshot(tmp_path)
    r = invoke("tile", tif, "-o", tmp_path / "r.zarr", "--tile-size", "256", "--overlap", "32", "--json", *opts)
    assert r.exit_code == 0, r.output
    err = " ".join(r.stderr.split())  # the log wraps long lines
    assert "not a microscope pixel size" in err and "pass --mpp" in err
    summary = json.loads(r.stdout)
    assert summary["source_mpp"] is None
    if method:
        assert summary["downsample"] == 1.0
    else:  # no pixel size: the zoom comes from the nuclei themselves, not a 352x upsampling
        assert 0.3 <= summary["downsample"] <= 4.0
    unchanged_but(before, snapshot(tmp_path), "r.zarr")
    before = snapshot(tmp_path)
    r = invoke("info", tif, *(opts or ["--probe", "0"]))
    assert r.exit_code == 0 and "not a microscope pixel size" in r.stderr, r.output
    assert snapshot(tmp_path) == before


def test_a_fifo_as_the_slide_is_an_error_not_a_hang(tmp_path):
    fifo = tmp_path / "slide.svs"
    os.mkfifo(fifo)
    before = snapshot(tmp_path)
    for args in (["info", fifo], ["tile", fifo, "-o", tmp_path / "r.zarr", *TILE],
                 ["segment", fifo, "-o", tmp_path / "r.geojson", *SEG]):
        one_line_error(invoke(*args), 2, "slide.svs is not a regular file")
    assert snapshot(tmp_path) == before


# ====================================================================== an empty --method
@pytest.mark.parametrize("name", ["", " "], ids=["empty", "blank"])
def test_an_empty_method_name_is_a_usage_error(he_png, tmp_path, name):
    img = Path(shutil.copy(he_png, tmp_path / "he.png"))
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "labels").mkdir()
    write_png(tmp_path / "ds" / "images" / "a.png", np.full((32, 32, 3), 200, np.uint8))
    tifffile.imwrite(tmp_path / "ds" / "labels" / "a.tif", np.zeros((32, 32), np.uint16))
    before = snapshot(tmp_path)
    for args in (["info", img, "--probe", "0"], ["tile", img, "-o", tmp_path / "r.zarr", *TILE],
                 ["segment", img, "-o", tmp_path / "r.geojson", "--mpp", "0.5", "--quiet"],
                 ["evaluate", "--dataset", tmp_path / "ds", "--quiet"],
                 ["train", "--data", tmp_path / "ds", "-o", tmp_path / "t", "--quiet"]):
        one_line_error(invoke(*args, "--method", name), 1, "--method is empty")
    assert snapshot(tmp_path) == before


# ====================================================================== an ASCII-only terminal
@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"},
                                 {"LANG": "C", "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}],
                         ids=["PYTHONIOENCODING=ascii", "LANG=C"])
def test_an_ascii_only_output_gets_um_not_a_crash(tmp_path, env):
    tif = _striped_tiff(tmp_path / "s.tif", 0)  # 0.5 µm/px
    dpi = tmp_path / "dpi.tif"  # 72 dpi: a warning naming µm/px
    tifffile.imwrite(dpi, np.full((64, 64, 3), 200, np.uint8), photometric="rgb", resolution=(72, 72),
                     resolutionunit="INCH")
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8", "LC_ALL", "LANG")}
    cmd = [sys.executable, "-c", "from nucli.cli import app; app(prog_name='nucli')"]
    before = snapshot(tmp_path)

    def run(*args):
        r = subprocess.run(cmd + [str(a) for a in args], env={**base, **env}, capture_output=True, timeout=300)
        return r.returncode, r.stdout.decode("ascii"), r.stderr.decode("ascii")  # nothing but ASCII

    rc, out, err = run("info", tif, "--probe", "0", "--method", "watershed")
    assert rc == 0 and "0.5 um/px (metadata)" in out and "Error" not in err, (out, err)
    rc, out, err = run("info", dpi, "--probe", "0", "--method", "watershed")
    assert rc == 0 and "352.8 um/px is not a microscope pixel size" in " ".join(err.split()), err
    rc, out, err = run("tile", tif, "-o", tmp_path / "r.zarr", "--mpp", "100")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "--mpp 100 um/px" in err, err
    assert snapshot(tmp_path) == before


# ====================================================================== OME pixel sizes, whatever the reader
@pytest.mark.parametrize("dtype, tile, size, unit, reader", [
    (np.uint8, (256, 256), 0.5, "µm", "openslide"),  # tiled 8-bit RGB: OpenSlide's generic TIFF
    (np.uint8, None, 0.5, "µm", "tiffslide"),  # stripped 8-bit RGB: tiffslide
    (np.uint8, None, 500, "nm", "tiffslide"),
    (np.uint16, None, 0.5, "µm", "image"),  # 16-bit: the plain-image reader (read it before)
], ids=["8-bit tiled", "8-bit stripped", "8-bit stripped nm", "16-bit"])
def test_ome_tiff_pixel_size_is_read_by_every_reader(tmp_path, dtype, tile, size, unit, reader):
    from nucli.slide import open_slide

    path = tmp_path / "s.ome.tif"
    rgb = np.random.default_rng(0).integers(0, 255, (300, 400, 3)).astype(dtype)
    tifffile.imwrite(path, rgb, photometric="rgb", tile=tile, ome=True,
                     metadata={"PhysicalSizeX": size, "PhysicalSizeY": size, "PhysicalSizeXUnit": unit})
    before = snapshot(tmp_path)
    with open_slide(path) as slide:
        assert slide.backend == reader and slide.mpp == pytest.approx(0.5)
    r = invoke("info", path, "--probe", "0", "--method", "watershed")
    assert r.exit_code == 0 and "0.5 µm/px (metadata)" in r.stdout, r.output
    assert snapshot(tmp_path) == before


# ====================================================================== NaN pixels in a float image
def test_nan_pixels_in_a_float_image_are_background_with_one_warning(tmp_path):
    gt = blob_labels(400, 300, 40, seed=2, r=(7, 10), touching_pairs=0)
    img = np.where(gt > 0, 0.8, 0.05).astype(np.float32)
    img += np.random.default_rng(0).normal(0, 0.01, gt.shape).astype(np.float32)
    holes = ([5, 100, 200, 250], [7, 150, 390, 20])
    assert not gt[holes].any()
    tifffile.imwrite(tmp_path / "clean.tif", img)
    img[holes] = [np.nan, np.nan, np.inf, -np.inf]
    tifffile.imwrite(tmp_path / "nan.tif", img)
    before = snapshot(tmp_path)
    counts = {}
    for name in ("clean", "nan"):
        r = invoke("segment", tmp_path / f"{name}.tif", "-o", tmp_path / f"{name}.geojson", "--overlay",
                   tmp_path / f"{name}.png", "--json", *SEG)  # the overlay opens the image a second time
        assert r.exit_code == 0, r.output
        counts[name] = json.loads(r.stdout)["nuclei"]
        err = " ".join(r.stderr.split())
        assert "RuntimeWarning" not in err and "invalid value" not in err, err
        assert err.count("not numbers") == (name == "nan"), err
    assert counts["nan"] == counts["clean"] == 40
    unchanged_but(before, snapshot(tmp_path), *(f"{n}.{ext}" for n in ("clean", "nan")
                                                for ext in ("geojson", "png", "nucli.zarr")))
    from nucli.tiling.store import RunStore

    store = RunStore.open(tmp_path / "nan.nucli.zarr")
    i = next(k for k, rc in enumerate(store.indices()) if tuple(rc) == (0, 0))
    assert tuple(store.read_tile(i)[5, 7]) == (0, 0, 0)  # NaN -> the background (dark: fluorescence)


# ====================================================================== a slide cut short after a whole image
def test_a_slide_cut_short_after_its_last_whole_image_is_read_with_one_warning(tmp_path, monkeypatch):
    import nucli.slide_backends as backends
    from nucli.synthetic import make_tissue, write_pyramidal_tiff

    tissue = make_tissue(1024, 768, 1, seed=3, island_radius=(370, 380))
    macro = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    whole = write_pyramidal_tiff(tmp_path / "whole.svs", tissue.render, 1024, 768, mpp=0.5, compression="jpeg",
                                 associated={"label": macro[:50, :50], "macro": macro})
    data = whole.read_bytes()
    with tifffile.TiffFile(whole) as tif:
        last = tif.pages[-1].offset  # the macro picture's directory
    (tmp_path / "cut.svs").write_bytes(data[:last])  # cut where the macro begins
    (tmp_path / "cut-in-ifd.svs").write_bytes(data[:last + 30])  # in the middle of its directory: damaged
    one_line_error(invoke("info", tmp_path / "cut-in-ifd.svs", "--probe", "0"), 2, "damaged or truncated")
    args = ["--mpp-target", "0.5", "--tile-size", "256", "--overlap", "32", "--quiet", "--no-tissue-mask"]
    r = invoke("tile", whole, "-o", tmp_path / "whole.zarr", *args)
    assert r.exit_code == 0 and "cut short" not in r.stderr, r.output
    from nucli.tiling.store import RunStore

    ref = np.asarray(RunStore.open(tmp_path / "whole.zarr").array("tiles")[:])
    name = "cut.svs"
    before = snapshot(tmp_path)
    r = invoke("info", tmp_path / name, "--probe", "0", "--method", "watershed")
    assert r.exit_code == 0, r.output
    err = " ".join(r.stderr.split())
    assert err.count("looks cut short") == 1 and "the images after the first 4" in err, err
    assert snapshot(tmp_path) == before
    out = tmp_path / f"{name}.zarr"
    monkeypatch.setattr(backends, "_WARNED", set())  # once per process: each command here is a process
    r = invoke("tile", tmp_path / name, "-o", out, *args)
    assert r.exit_code == 0 and " ".join(r.stderr.split()).count("looks cut short") == 1, r.output
    unchanged_but(before, snapshot(tmp_path), out.name)
    np.testing.assert_array_equal(np.asarray(RunStore.open(out).array("tiles")[:]), ref)  # level 0 is whole


@pytest.mark.parametrize("frac", [0.9, 0.5])
def test_a_synthetic_svs_cut_at_90_percent_is_refused(tmp_path, frac):
    """Its directories lie between the image data: cut at 90 % (or half), level 0's data runs past the end."""
    from nucli.synthetic import make_tissue, write_pyramidal_tiff

    tissue = make_tissue(1024, 768, 1, seed=3, island_radius=(370, 380))
    whole = write_pyramidal_tiff(tmp_path / "whole.svs", tissue.render, 1024, 768, mpp=0.5, compression="jpeg")
    data = whole.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: int(len(data) * frac)])
    before = snapshot(tmp_path)
    for args in (["info", cut, "--probe", "0", "--method", "watershed"], ["tile", cut, "-o", tmp_path / "r.zarr", *TILE],
                 ["segment", cut, "-o", tmp_path / "r.geojson", *SEG]):
        one_line_error(invoke(*args), 2, "cut.svs is a damaged or truncated TIFF/slide file", "image data ends at byte")
    assert snapshot(tmp_path) == before


def test_the_real_svs_cut_at_90_percent_is_read_with_one_warning(cmu_slide, tmp_path, monkeypatch):
    """CMU-1-Small-Region.svs keeps its directories after the data: cut at 90 %, its label/macro pictures and
    a reduced level are gone, level 0 is whole and read as before, with one warning."""
    import nucli.slide_backends as backends
    from nucli.slide import open_slide

    data = cmu_slide.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: int(len(data) * 0.9)])
    before = snapshot(tmp_path)
    monkeypatch.setattr(backends, "_WARNED", set())
    r = invoke("info", cut, "--probe", "0", "--method", "watershed")
    assert r.exit_code == 0, r.output
    err = " ".join(r.stderr.split())
    assert err.count("looks cut short") == 1 and "the images after the first 2" in err, err
    with open_slide(cmu_slide) as whole, open_slide(cut) as part:
        assert part.dimensions == whole.dimensions
        np.testing.assert_array_equal(part.read_region(1000, 1500, 512, 512), whole.read_region(1000, 1500, 512, 512))
    assert snapshot(tmp_path) == before


# ====================================================================== settings of the wrong type in a weights file
def _weights_with(tmp_path: Path, method: str, edit) -> Path:
    """The shipped weights of ``method`` with ``edit(config)`` applied to the config in their metadata."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from nucli.models.registry import get_spec

    src = get_spec(method).weights_path
    if src is None or not src.exists():
        pytest.skip(f"{method} weights are not installed")
    with safe_open(str(src), framework="np") as fh:
        meta = dict(fh.metadata())
    config = json.loads(meta["nucli.config"])
    edit(config)
    meta["nucli.config"] = json.dumps(config)
    out = tmp_path / f"{method}-edited.safetensors"
    save_file(load_file(str(src)), str(out), metadata=meta)
    return out


def _set(path: str, value):
    def edit(config):
        node = config
        *parents, leaf = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return edit


@pytest.mark.parametrize("method, key, value, words", [
    ("gensegnet", "params.postprocess.body_threshold", "abc", ['body_threshold = "abc"', "between 0 and 1"]),
    ("gensegnet", "params.postprocess.min_area", [1, 2], ["min_area = [1, 2]", "expected a number"]),
    ("gensegnet", "params.bf16", {"x": 1}, ['params.bf16 = {"x": 1}', 'expected true, false or "auto"']),
    ("gensegnet", "params.postprocess.background_threshold", float("nan"), ["= NaN", "between 0 and 1"]),
    ("harunet", "params.mask_threshold", 1.5, ["params.mask_threshold = 1.5", "between 0 and 1"]),
    ("harunet", "params.tta", "yes", ['params.tta = "yes"', "expected true or false"]),
    ("harunet", "params.min_area", True, ["params.min_area = true", "expected a number"]),
    ("harunet", "tile_size", 300.5, ["tile_size = 300.5", "a whole number between 16 and 8192"]),
], ids=["body_threshold abc", "min_area list", "bf16 object", "background_threshold NaN",
        "harunet mask_threshold 1.5", "harunet tta yes", "harunet min_area true", "harunet tile_size 300.5"])
def test_a_weights_config_with_settings_of_the_wrong_type_is_refused(he_png, tmp_path, method, key, value, words):
    img = Path(shutil.copy(he_png, tmp_path / "he.png"))
    weights = _weights_with(tmp_path, method, _set(key, value))
    before = snapshot(tmp_path)
    one_line_error(invoke("segment", img, "-o", tmp_path / "o.geojson", "--mpp", "0.5", "--quiet", "--method", method,
                          "--weights", weights), 2, weights.name, "config stored in the weights file", *words)
    r = invoke("info", img, "--probe", "1", "--method", method, "--weights", weights, "--json")
    assert r.exit_code == 0, r.output  # info describes the slide; its time estimate names the problem
    estimate = json.loads(r.stdout)["estimate"]
    assert estimate.startswith("not measured: ") and all(w in estimate for w in words), estimate
    assert snapshot(tmp_path) == before
    from nucli.errors import WeightsError
    from nucli.models.registry import build_method

    with pytest.raises(WeightsError, match=key.split(".")[-1]):
        build_method(method, weights=weights)


# ====================================================================== a damaged chunk in a run store
def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = bytearray()
    else:  # flipped bytes
        for k in range(20, len(data), 7):
            data[k] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flipped", "empty"])
def test_a_damaged_chunk_in_a_run_store_names_its_file_and_deleting_it_recovers(run_dir, tmp_path, how):
    d = fresh_run(run_dir, tmp_path / "run")
    store = d / "n.nucli.zarr"
    tile_chunk, label_chunk = store / "tiles/c/4/0/0/0", store / "labels/c/2/0/0"
    _damage(tile_chunk, how)
    _damage(label_chunk, how)
    before = snapshot(tmp_path)
    for args in (["stitch", store, "-o", d / "x.geojson"],
                 ["segment", store, "--method", "watershed", "-o", d / "y.geojson"]):
        one_line_error(invoke(*args, "--quiet"), 2, "n.nucli.zarr: the run store is damaged", "array 'tiles'",
                       "tile 4", "tiles/c/4/0/0/0", "cannot be decoded", "delete that file", "--overwrite")
    assert snapshot(tmp_path) == before
    rerun = ["segment", d / "he.png", "-o", d / "n.geojson", "-f", "csv", "-f", "labels", "--overlay", d / "n.png",
             *SEG, "--overwrite", "--json"]
    tile_chunk.unlink()  # as the message says: the same command writes the tile again ...
    r = invoke(*rerun)
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2 and "Traceback" not in r.output and "missing from the store (deleted files); writing them " \
        "again" in err and sum(line.startswith("Error:") for line in r.stderr.splitlines()) == 1, r.output
    for words in ("array 'labels'", "tile 2", "labels/c/2/0/0", "rerun `nucli segment`"):
        assert words in err, (words, err)
    assert (d / "n.geojson").read_bytes() == (run_dir / "n.geojson").read_bytes()  # the old output is kept
    label_chunk.unlink()  # ... and segments the tile again
    r = invoke(*rerun)
    assert r.exit_code == 0 and json.loads(r.stdout)["tiles_segmented_now"] == 1, r.output
    assert (d / "n.geojson").read_bytes() == (run_dir / "n.geojson").read_bytes()
    assert (d / "n.csv").read_bytes() == (run_dir / "n.csv").read_bytes()


def test_a_damaged_done_record_names_its_file(run_dir, tmp_path):
    d = fresh_run(run_dir, tmp_path / "run")
    store = d / "n.nucli.zarr"
    _damage(store / "done/segment/c/3", "empty")
    before = snapshot(tmp_path)
    one_line_error(invoke("stitch", store, "-o", d / "x.geojson", "--quiet"), 2, "array 'done/segment'", "tile 3",
                   "done/segment/c/3", "rerun `nucli segment`")
    assert snapshot(tmp_path) == before
    (store / "done/segment/c/3").unlink()  # tile 3 is not done: segmented again
    r = invoke("segment", store, "--method", "watershed", "-o", d / "n.geojson", "--overwrite", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["tiles_segmented_now"] == 1, r.output
    assert (d / "n.geojson").read_bytes() == (run_dir / "n.geojson").read_bytes()


# ====================================================================== leftovers of a killed export
def _kill_after(proc: subprocess.Popen, marks: int) -> None:
    seen = 0
    while seen < marks:
        line = proc.stderr.readline()
        assert line, "the run ended before it was killed"
        seen += line.startswith("@progress")
    proc.kill()
    proc.wait(timeout=60)


def test_temporary_files_of_a_killed_export_are_removed_by_the_next_run(run_dir, tmp_path):
    import fcntl

    from test_hardening import nucli_slowed

    d = fresh_run(run_dir, tmp_path / "run")
    store, out = d / "n.nucli.zarr", d / "o.geojson"
    args = ["stitch", store, "-o", out, "-f", "csv", "-f", "labels", "--quiet"]
    names = set(os.listdir(d))
    _kill_after(nucli_slowed(("nucli.stitching", "-", "tile_nuclei", 0.3), *args), 2)
    left = sorted(set(os.listdir(d)) - names)
    assert len(left) == 3 and all(n.startswith((".o.geojson.", ".o.csv.", ".o.labels.zarr.")) and
                                  n.endswith(".tmp") for n in left), left  # what SIGKILL leaves
    old = time.time() - 120
    for n in left:
        os.utime(d / n, (old, old))
    # what must stay: a file of the user's, a temporary file a live run holds, one just made
    (d / ".o.geojson.notes").write_text("mine")
    (d / ".o.csv.0123456789ab.tmp").write_text("being written")
    os.utime(d / ".o.csv.0123456789ab.tmp", (old, old))
    fresh = d / ".o.geojson.abcdefabcdef.tmp"
    fresh.write_text("just begun")
    keep = {".o.geojson.notes", ".o.csv.0123456789ab.tmp", fresh.name}
    with open(d / ".o.csv.0123456789ab.tmp", "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        before = snapshot(d)
        r = invoke(*args)
    assert r.exit_code == 0, r.output
    after = snapshot(d)
    assert sorted(set(os.listdir(d)) - names) == sorted(keep | {"o.geojson", "o.csv", "o.labels.zarr"})
    assert all(after[k] == before[k] for k in before if k.split(os.sep)[0] in names | keep)  # nothing else changed
    assert out.read_bytes() == (run_dir / "n.geojson").read_bytes()
    assert (d / "o.csv").read_bytes() == (run_dir / "n.csv").read_bytes()
