"""`nucli tile`: tiles equal the slide at their coordinates; reruns, refusals, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nucli.cli import app
from nucli.errors import InputError, OutputExistsError, StoreError, UsageError
from nucli.synthetic import make_tissue, write_pyramidal_tiff
from nucli.tiling.store import RunStore
from nucli.tiling.tiler import run_tiling, tile_slide

runner = CliRunner()
FAST = ["--mpp-target", "0.5", "--tile-size", "256", "--overlap", "32", "--quiet"]


# ---------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """Lossless synthetic SVS, 3072 x 2048 at 0.5 µm/px, two islands."""
    d = tmp_path_factory.mktemp("tile")
    tissue = make_tissue(3072, 2048, 2, seed=11, island_radius=(300, 420))
    path = write_pyramidal_tiff(d / "slide.svs", tissue.render, 3072, 2048, mpp=0.5, compression="zlib")
    return path, tissue


def contents(path: Path) -> dict:
    """Everything a later stage reads from a tile store."""
    s = RunStore.open(path)
    return {
        "meta": s.meta,
        "index": s.indices(),
        "origin": s.origins(),
        "origin_level0": np.asarray(s.array("origin_level0")[:]),
        "tiles": np.asarray(s.array("tiles")[:]),
        "done": s.done("tile"),
    }


def assert_same_store(a: Path, b: Path) -> None:
    ca, cb = contents(a), contents(b)
    assert ca["meta"] == cb["meta"]
    for key in ("index", "origin", "origin_level0", "tiles", "done"):
        np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)


def file_state(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") or p.name == name]


# ---------------------------------------------------------------------- acceptance: real slide
def test_cmu_tiles_equal_the_slide_at_their_coordinates(cmu_slide, tmp_path):
    import openslide

    out = tmp_path / "cmu.zarr"
    result = runner.invoke(app, ["tile", str(cmu_slide), "-o", str(out), "--mpp-target", "0.5",
                                 "--tile-size", "512", "--overlap", "64", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "created" and summary["tiles"] > 0
    store = RunStore.open(out)
    m = store.meta
    assert m["source_mpp"] == pytest.approx(0.499) and m["working_mpp"] == pytest.approx(0.499)
    assert m["downsample"] == 1.0 and m["level0_size"] == [2220, 2967] and m["working_size"] == [2220, 2967]
    assert m["source"]["vendor"] == "aperio" and m["source"]["path"] == str(cmu_slide.resolve())
    assert m["tile_size"] == 512 and m["overlap"] == 64 and m["tissue_mask"] is True
    assert m["grid"]["xs"] == store.grid.xs and m["grid"]["ys"] == store.grid.ys
    assert 0 < store.n_tiles < len(store.grid) == summary["grid_tiles"]
    assert store.is_complete("tile")
    osr = openslide.OpenSlide(str(cmu_slide))
    origins, origins0 = store.origins(), np.asarray(store.array("origin_level0")[:])
    np.testing.assert_array_equal(origins0, origins.astype(float))  # downsample 1
    for i in range(store.n_tiles):
        x, y = (int(v) for v in origins0[i])
        ref = np.asarray(osr.read_region((x, y), 0, (512, 512)).convert("RGBA"))
        rgb = np.where(ref[..., 3:] == 0, 255, ref[..., :3])  # outside the slide: white
        np.testing.assert_array_equal(store.read_tile(i), rgb, err_msg=f"tile {i} at {(x, y)}")


# ---------------------------------------------------------------------- synthetic slides
def test_tiles_at_a_coarser_working_size(slide, tmp_path):
    """1.0 µm/px on a 0.5 µm/px slide: each tile is the 2x2 block mean of level 0."""
    path, tissue = slide
    report = run_tiling(path, tmp_path / "r.zarr", mpp_target=1.0, tile_size=256, overlap=32, progress=False)
    store = report.store
    assert report.status == "created" and report.written == store.n_tiles > 0
    assert store.meta["downsample"] == 2.0 and store.meta["working_size"] == [1536, 1024]
    o0 = np.asarray(store.array("origin_level0")[:])
    np.testing.assert_array_equal(o0, store.origins() * 2.0)
    for i in range(store.n_tiles):
        x, y = (int(v) for v in o0[i])
        full = tissue.render(x, y, 512, 512, 1.0).astype(np.float64)
        ref = np.round(full.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3)))
        w0, h0 = tissue.width - x, tissue.height - y  # padding beyond the slide is white
        ref[h0 // 2 :, :] = 255
        ref[:, w0 // 2 :] = 255
        assert np.abs(store.read_tile(i).astype(int) - ref).max() <= 1, i


def test_only_tiles_touching_the_islands_are_kept(slide, tmp_path):
    path, tissue = slide
    store = tile_slide(path, tmp_path / "t.zarr", mpp_target=0.5, tile_size=256, overlap=32, progress=False)
    grid = store.grid
    kept = {tuple(map(int, rc)) for rc in store.indices()}
    margin = 25 / 0.5 + 2 * store.meta["mask_downsample"]  # mask dilation + two mask px

    def distance_to_islands(r: int, c: int) -> float:
        x, y = grid.origin(r, c)
        xs = np.linspace(x, x + 255, 64)
        ys = np.linspace(y, y + 255, 64)
        best = np.inf
        for isl in tissue.islands:  # distance from the tile to the ellipse, approximately via scaled radius
            px = np.clip(isl.cx, xs[0], xs[-1])
            py = np.clip(isl.cy, ys[0], ys[-1])
            rho = np.hypot((px - isl.cx) / isl.rx, (py - isl.cy) / isl.ry)
            best = min(best, (rho - 1.0) * min(isl.rx, isl.ry))
        return best

    for r, c in grid.all_tiles():
        dist = distance_to_islands(r, c)
        if dist < -4:  # clearly overlaps an island
            assert (r, c) in kept, (r, c)
        if dist > margin:
            assert (r, c) not in kept, (r, c)
    assert len(kept) < len(grid) / 2


def test_no_tissue_mask_tiles_everything(slide, tmp_path):
    path, _ = slide
    store = tile_slide(path, tmp_path / "all.zarr", mpp_target=0.5, tile_size=256, overlap=32,
                       tissue_mask=False, progress=False)
    assert store.n_tiles == len(store.grid)
    assert store.meta["tissue_mask"] is False and store.meta["tissue_fraction"] is None
    assert [tuple(map(int, v)) for v in store.indices()] == store.grid.all_tiles()


def test_rerun_on_a_complete_store_is_a_no_op(slide, tmp_path):
    path, _ = slide
    out = tmp_path / "a.zarr"
    tile_slide(path, out, mpp_target=0.5, tile_size=256, overlap=32, progress=False)
    before = file_state(out)
    report = run_tiling(path, out, mpp_target=0.5, tile_size=256, overlap=32, progress=False)
    assert report.status == "complete" and report.written == 0
    assert file_state(out) == before


def test_copied_slide_continues_the_same_store(slide, tmp_path):
    path, _ = slide
    out = tmp_path / "a.zarr"
    tile_slide(path, out, mpp_target=0.5, tile_size=256, overlap=32, progress=False)
    copy = tmp_path / "moved" / "slide.svs"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    report = run_tiling(copy, out, mpp_target=0.5, tile_size=256, overlap=32, progress=False)
    assert report.status == "complete"


def test_other_settings_are_refused_and_overwrite_replaces(slide, tmp_path):
    path, _ = slide
    out = tmp_path / "a.zarr"
    tile_slide(path, out, mpp_target=0.5, tile_size=256, overlap=32, progress=False)
    before = file_state(out)
    with pytest.raises(StoreError, match=r"overlap differ.*--overwrite"):
        tile_slide(path, out, mpp_target=0.5, tile_size=256, overlap=48, progress=False)
    result = runner.invoke(app, ["tile", str(path), "-o", str(out), "--mpp-target", "1.0", "--tile-size", "256",
                                 "--overlap", "32", "--quiet"])
    assert result.exit_code == 2 and "working_mpp" in result.stderr and "Traceback" not in result.output
    assert file_state(out) == before
    store = tile_slide(path, out, mpp_target=0.5, tile_size=256, overlap=48, overwrite=True, progress=False)
    assert store.overlap == 48 and store.is_complete("tile")
    assert leftovers(tmp_path, "a.zarr") == ["a.zarr"]


def test_store_of_another_slide_is_refused(slide, tmp_path):
    path, _ = slide
    other_tissue = make_tissue(3072, 2048, 2, seed=99, island_radius=(300, 420))
    other = write_pyramidal_tiff(tmp_path / "other.svs", other_tissue.render, 3072, 2048, mpp=0.5,
                                 compression="zlib")
    out = tmp_path / "a.zarr"
    tile_slide(path, out, mpp_target=0.5, tile_size=256, overlap=32, progress=False)
    with pytest.raises(StoreError, match="another slide"):
        tile_slide(other, out, mpp_target=0.5, tile_size=256, overlap=32, progress=False)


def test_defaults_come_from_the_method_config(slide, tmp_path, monkeypatch):
    from nucli.models import registry
    from nucli.models.base import MethodConfig

    cfg = MethodConfig(name="probe", mpp=1.0, tile_size=192, overlap=24)
    spec = registry.MethodSpec(name="probe", summary="test", config=cfg, builder=lambda *a: None)
    registry.available()  # load the built-in methods first
    monkeypatch.setitem(registry._REGISTRY, "probe", spec)
    store = tile_slide(slide[0], tmp_path / "m.zarr", method="probe", progress=False)
    m = store.meta
    assert (m["tile_size"], m["overlap"], m["working_mpp"], m["method"]) == (192, 24, 1.0, "probe")
    with pytest.raises(UsageError, match="unknown method 'nope'"):
        tile_slide(slide[0], tmp_path / "n.zarr", method="nope", progress=False)


def test_slide_without_pixel_size_is_tiled_at_native_resolution(tmp_path, caplog):
    import skimage.io

    tissue = make_tissue(900, 700, 1, seed=2, island_radius=(150, 200))
    skimage.io.imsave(tmp_path / "img.png", tissue.render(0, 0, 900, 700, 1.0), check_contrast=False)
    with caplog.at_level("WARNING", logger="nucli"):
        store = tile_slide(tmp_path / "img.png", tmp_path / "p.zarr", tile_size=256, overlap=32, progress=False,
                           mpp="native")
    assert "no pixel size" in caplog.text
    m = store.meta
    assert m["source_mpp"] is None and m["working_mpp"] is None and m["downsample"] == 1.0
    assert m["working_size"] == [900, 700] and m["source"]["backend"] == "image"
    assert m["auto_scale"] is None
    i = 0
    x, y = store.origins()[i]
    np.testing.assert_array_equal(store.read_tile(i)[: 700 - y, : 900 - x],
                                  tissue.render(int(x), int(y), 256, 256, 1.0)[: 700 - y, : 900 - x])
    # with --mpp the same image gets a pixel size
    store2 = tile_slide(tmp_path / "img.png", tmp_path / "q.zarr", mpp=0.25, mpp_target=0.5, tile_size=256,
                        overlap=32, progress=False)
    assert store2.meta["working_size"] == [450, 350] and store2.meta["source_mpp_from"] == "--mpp"


def test_slide_without_pixel_size_gets_the_zoom_search_by_default(tmp_path):
    """The shipped gensegnet weights were trained at one working scale: no --mpp means `auto`."""
    import skimage.io

    from nucli.autoscale import auto_by_default
    from nucli.models.registry import build_method

    assert auto_by_default(build_method("gensegnet").config)
    tissue = make_tissue(900, 700, 1, seed=2, island_radius=(150, 200))
    skimage.io.imsave(tmp_path / "img.png", tissue.render(0, 0, 900, 700, 1.0), check_contrast=False)
    store = tile_slide(tmp_path / "img.png", tmp_path / "p.zarr", tile_size=256, overlap=32, progress=False)
    m = store.meta
    assert m["source_mpp"] is None and m["source_mpp_from"] == "auto"
    assert m["auto_scale"]["n_nuclei"] > 0 and m["downsample"] == pytest.approx(1.0 / m["auto_scale"]["zoom"])
    # resuming the same command finds the same store (the search is deterministic)
    again = tile_slide(tmp_path / "img.png", tmp_path / "p.zarr", tile_size=256, overlap=32, progress=False)
    assert again.meta["auto_scale"] == m["auto_scale"]


def test_cli_summary_and_progress_silence(slide, tmp_path):
    path, _ = slide
    out = tmp_path / "c.zarr"
    result = runner.invoke(app, ["tile", str(path), "-o", str(out), "--mpp-target", "0.5", "--tile-size", "256",
                                 "--overlap", "32"])
    assert result.exit_code == 0, result.output
    flat = "".join(result.stdout.split())  # long paths are folded over lines
    for word in ("tiles", "tissue_fraction", "working_mpp", "seconds", str(out)):
        assert word in flat
    quiet = runner.invoke(app, ["tile", str(path), "-o", str(out), *FAST])
    assert quiet.exit_code == 0 and quiet.output.strip() == ""


def test_keyboard_interrupt_leaves_a_resumable_store(slide, tmp_path, monkeypatch):
    from nucli.slide import Slide

    path, _ = slide
    ref = tmp_path / "ref.zarr"
    tile_slide(path, ref, mpp_target=0.5, tile_size=256, overlap=32, progress=False)
    out = tmp_path / "int.zarr"
    real = Slide.read_scaled
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Slide, "read_scaled", flaky)
    result = runner.invoke(app, ["tile", str(path), "-o", str(out), *FAST])
    assert result.exit_code == 130 and "rerun" in result.output
    done = RunStore.open(out).done("tile")
    assert 0 < done.sum() < done.size
    monkeypatch.setattr(Slide, "read_scaled", real)
    again = runner.invoke(app, ["tile", str(path), "-o", str(out), *FAST, "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["status"] == "resumed"
    assert_same_store(ref, out)


# ---------------------------------------------------------------------- bad input
def _bad_inputs(tmp: Path, slide_path: Path) -> dict[str, tuple[Path, list[str]]]:
    import skimage.io

    (tmp / "folder").mkdir()
    (tmp / "empty.svs").write_bytes(b"")
    (tmp / "notes.svs").write_text("not a slide\n")
    data = slide_path.read_bytes()
    (tmp / "cut.svs").write_bytes(data[: len(data) // 2])
    skimage.io.imsave(tmp / "white.png", np.full((600, 800, 3), 255, np.uint8), check_contrast=False)
    skimage.io.imsave(tmp / "nompp.png", np.full((64, 64, 3), 128, np.uint8), check_contrast=False)
    return {
        "missing": (tmp / "absent.svs", ["not found"]),
        "directory": (tmp / "folder", ["directory"]),
        "zero-byte": (tmp / "empty.svs", ["empty"]),
        "text named .svs": (tmp / "notes.svs", ["not a slide"]),
        "truncated": (tmp / "cut.svs", ["truncated"]),
        "no tissue": (tmp / "white.png", ["no tissue found"]),
        "no pixel size": (tmp / "nompp.png", ["no pixel size", "--mpp"]),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "zero-byte", "text named .svs", "truncated",
                                  "no tissue", "no pixel size"])
def test_bad_input_one_line_error_nothing_written(slide, tmp_path, case):
    src, words = _bad_inputs(tmp_path, slide[0])[case]
    outdir = tmp_path / "out"
    outdir.mkdir()
    extra = ["--mpp", "0.5"] if case == "no tissue" else []
    result = runner.invoke(app, ["tile", str(src), "-o", str(outdir / "run.zarr"), *FAST, *extra])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in result.output
    assert str(src) in err
    for w in words:
        assert w in err
    assert list(outdir.iterdir()) == []


def test_real_truncated_svs_is_refused(cmu_slide, tmp_path):
    data = cmu_slide.read_bytes()
    (tmp_path / "half.svs").write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, ["tile", str(tmp_path / "half.svs"), "-o", str(tmp_path / "r.zarr"), *FAST])
    assert result.exit_code == 2 and "truncated" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.zarr").exists()


def test_unwritable_output_under_a_file(slide, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    result = runner.invoke(app, ["tile", str(slide[0]), "-o", str(blocker / "run.zarr"), *FAST])
    assert result.exit_code == 2 and "file.txt" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
def test_unwritable_output_in_a_read_only_directory(slide, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = runner.invoke(app, ["tile", str(slide[0]), "-o", str(ro / "run.zarr"), *FAST])
        assert result.exit_code == 2 and "permission" in result.stderr.lower()
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_unwritable_output_on_a_read_only_filesystem(slide):
    result = runner.invoke(app, ["tile", str(slide[0]), "-o", "/proc/nucli-test/run.zarr", *FAST])
    assert result.exit_code == 2 and "/proc/nucli-test/run.zarr" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_missing_output_folders_are_created(slide, tmp_path):
    out = tmp_path / "a" / "b" / "run.zarr"
    store = tile_slide(slide[0], out, mpp_target=0.5, tile_size=256, overlap=32, progress=False)
    assert store.is_complete("tile") and out.is_dir()


def test_a_failed_creation_leaves_nothing(slide, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunStore, "create", full_disk)
    with pytest.raises(InputError, match="No space left on device"):
        tile_slide(slide[0], tmp_path / "new" / "run.zarr", mpp_target=0.5, tile_size=256, overlap=32,
                   progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_that_is_not_a_store(slide, tmp_path):
    out = tmp_path / "run.zarr"
    out.write_text("keep me")
    result = runner.invoke(app, ["tile", str(slide[0]), "-o", str(out), *FAST])
    assert result.exit_code == 2 and "--overwrite" in result.stderr and out.read_text() == "keep me"
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "important.csv").write_text("1,2")
    with pytest.raises(OutputExistsError, match="refusing"):
        tile_slide(slide[0], folder, mpp_target=0.5, tile_size=256, overlap=32, overwrite=True, progress=False)
    assert (folder / "important.csv").read_text() == "1,2"
    # --overwrite replaces only what nucli wrote: the user's file stays; an empty file may go
    with pytest.raises(OutputExistsError, match="refusing to replace .*a file of 7 bytes that nucli did not write"):
        tile_slide(slide[0], out, mpp_target=0.5, tile_size=256, overlap=32, overwrite=True, progress=False)
    assert out.read_text() == "keep me"
    out.write_text("")
    store = tile_slide(slide[0], out, mpp_target=0.5, tile_size=256, overlap=32, overwrite=True, progress=False)
    assert out.is_dir() and store.is_complete("tile")


def test_mpp_target_on_a_slide_without_pixel_size_is_an_input_error(tmp_path):
    import skimage.io

    skimage.io.imsave(tmp_path / "x.png", np.full((64, 64, 3), 100, np.uint8), check_contrast=False)
    with pytest.raises(InputError, match=r"x.png has no pixel size in its metadata; pass --mpp"):
        tile_slide(tmp_path / "x.png", tmp_path / "x.zarr", mpp_target=0.5, tile_size=64, overlap=8, progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_fluorescence_16bit_image_keeps_tiles_around_the_nuclei(tmp_path):
    import tifffile

    img = np.full((1500, 1500), 300, np.uint16)  # dark background
    yy, xx = np.mgrid[0:1500, 0:1500]
    for cx, cy in [(200, 200), (230, 260), (1300, 1250)]:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= 12**2] = 9000  # bright nuclei
    tifffile.imwrite(tmp_path / "dapi.tif", img)
    store = tile_slide(tmp_path / "dapi.tif", tmp_path / "f.zarr", mpp=0.5, mpp_target=0.5, tile_size=256,
                       overlap=32, progress=False)
    m = store.meta
    assert m["background"] == [0, 0, 0] and m["source"]["backend"] == "image"
    kept = {tuple(map(int, rc)) for rc in store.indices()}
    grid = store.grid
    for rc in grid.all_tiles():
        x, y = grid.origin(*rc)
        near = any(x - 70 <= cx < x + 256 + 70 and y - 70 <= cy < y + 256 + 70
                   for cx, cy in [(200, 200), (230, 260), (1300, 1250)])
        touching = any(x <= cx < x + 256 and y <= cy < y + 256 for cx, cy in [(200, 200), (230, 260), (1300, 1250)])
        if touching:
            assert rc in kept
        if not near:
            assert rc not in kept
    i = next(i for i, rc in enumerate(store.indices()) if tuple(rc) == (0, 0))
    tile = store.read_tile(i)
    assert tuple(tile[200, 200]) == (255, 255, 255) and tuple(tile[100, 100]) == (0, 0, 0)


def test_tile_refuses_a_store_another_writer_holds(tmp_path):
    """`nucli tile` takes the store's lock: a segment run or --shard processes on it are not disturbed."""
    from nucli.errors import StoreError
    from nucli.parallel import Shard, StoreLock
    import skimage.io

    skimage.io.imsave(tmp_path / "img.png", np.full((200, 200, 3), 128, np.uint8), check_contrast=False)
    out = tmp_path / "run.zarr"
    kwargs = dict(mpp=0.5, tile_size=128, overlap=16, tissue_mask=False, progress=False)
    with StoreLock(out):
        with pytest.raises(StoreError, match="being written by another nucli process"):
            tile_slide(tmp_path / "img.png", out, **kwargs)
    assert not out.exists()
    tile_slide(tmp_path / "img.png", out, **kwargs)
    with StoreLock(out, Shard.parse("0/2")):
        with pytest.raises(StoreError, match="--shard processes"):
            tile_slide(tmp_path / "img.png", out, **kwargs)
    store = tile_slide(tmp_path / "img.png", out, **kwargs)  # free again: resumes (nothing to do)
    assert store.n_tiles > 0
