"""Slide reading: backends, pixel size, regions at a working pixel size, bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nucli.errors import InputError, UsageError
from nucli.slide import open_slide
from nucli.synthetic import make_tissue, write_pyramidal_tiff


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    """A lossless 2-level synthetic SVS (2048 x 1536 at 0.5 µm/px) and its renderer."""
    d = tmp_path_factory.mktemp("svs")
    tissue = make_tissue(2048, 1536, 2, seed=3, island_radius=(300, 450))
    path = write_pyramidal_tiff(d / "s.svs", tissue.render, 2048, 1536, mpp=0.5, compression="zlib", levels=2,
                                associated={"label": np.full((40, 60, 3), 90, np.uint8)})
    return path, tissue


@pytest.fixture(scope="module")
def ramp(tmp_path_factory):
    """Gray plain TIFF whose value is 0.1 * x (+ 0.05 * y): resampling must keep it linear."""
    d = tmp_path_factory.mktemp("ramp")
    yy, xx = np.mgrid[0:1200, 0:1600]
    img = np.round(0.1 * xx + 0.05 * yy).astype(np.uint8)
    path = d / "ramp.tif"
    tifffile.imwrite(path, img, tile=(128, 128), compression="zlib", resolution=(40000, 40000),
                     resolutionunit="CENTIMETER")  # 0.25 µm/px
    return path, img


# ---------------------------------------------------------------------- real slide
def test_cmu_slide_metadata_and_pixels(cmu_slide):
    import openslide

    with open_slide(cmu_slide) as s:
        assert s.backend == "openslide"
        assert s.vendor == "aperio"
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1 and s.level_downsamples == [1.0]
        assert s.mpp == pytest.approx(0.499)
        assert {"label", "macro", "thumbnail"} <= set(s.associated_images)
        label = s.associated_images["label"]
        assert label.ndim == 3 and label.shape[2] == 3 and label.dtype == np.uint8
        region = s.read_region(1000, 1200, 300, 200)
        ref = np.asarray(openslide.OpenSlide(str(cmu_slide)).read_region((1000, 1200), 0, (300, 200)))[..., :3]
        np.testing.assert_array_equal(region, ref)
        # 0.5 µm/px requested: within 5 % of the native size, so no resampling at all
        assert s.resolve_working_mpp(0.5) == pytest.approx(0.499)
        np.testing.assert_array_equal(s.read_working(1000, 1200, 300, 200, s.resolve_working_mpp(0.5)), ref)


# ---------------------------------------------------------------------- synthetic SVS
def test_synthetic_svs_levels_and_regions(svs):
    path, tissue = svs
    with open_slide(path) as s:
        assert s.backend == "openslide" and s.vendor == "aperio"
        assert s.dimensions == (2048, 1536)
        assert s.level_dimensions == [(2048, 1536), (512, 384)]
        assert s.mpp == pytest.approx(0.5)
        assert "label" in s.associated_images and s.associated_images["label"].shape == (40, 60, 3)
        thumb = s.thumbnail(256)
        assert thumb.shape == (192, 256, 3)
        assert np.abs(thumb.astype(int) - tissue.render(0, 0, 256, 192, 8.0)).mean() < 8
        isl = tissue.islands[0]
        x, y = int(isl.cx) - 100, int(isl.cy) - 80
        np.testing.assert_array_equal(s.read_region(x, y, 200, 160), tissue.render(x, y, 200, 160, 1.0))
        # level 1 in level-0 coordinates, like OpenSlide
        np.testing.assert_array_equal(s.read_region(400, 800, 64, 32, level=1), tissue.render(100, 200, 64, 32, 4.0))
        # working size 2.0 µm/px = the stored level exactly
        assert s.downsample_for(2.0) == 4.0
        assert s.working_size(2.0) == (512, 384)
        np.testing.assert_array_equal(s.read_working(100, 200, 64, 32, 2.0), tissue.render(100, 200, 64, 32, 4.0))
        # 1.0 µm/px: whole-number factor 2 from level 0 = 2x2 block mean
        got = s.read_working(300, 250, 100, 80, 1.0)
        full = tissue.render(600, 500, 200, 160, 1.0).astype(np.float64)
        ref = np.round(full.reshape(80, 2, 100, 2, 3).mean(axis=(1, 3))).astype(np.uint8)
        assert np.abs(got.astype(int) - ref).max() <= 1


def test_out_of_bounds_is_padded_with_background(svs):
    path, tissue = svs
    with open_slide(path) as s:
        assert s.background == (255, 255, 255)
        block = s.read_working(2000, 1500, 100, 100, 0.5)
        np.testing.assert_array_equal(block[:36, :48], tissue.render(2000, 1500, 48, 36, 1.0))
        assert (block[36:] == 255).all() and (block[:, 48:] == 255).all()
        assert (s.read_working(-50, -50, 40, 40, 0.5) == 255).all()


def test_tiffslide_fallback_for_tiffs_openslide_cannot_read(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=16)  # stripped: not OpenSlide's generic-tiff
    with open_slide(path) as s:
        assert s.backend == "tiffslide"
        np.testing.assert_array_equal(s.read_region(10, 20, 100, 50), img[20:70, 10:110])


def test_fingerprint_survives_copy_and_sees_changes(svs, tmp_path):
    path, _ = svs
    copy = tmp_path / "copy.svs"
    shutil.copy(path, copy)
    with open_slide(path) as a, open_slide(copy) as b:
        assert a.fingerprint == b.fingerprint
    data = bytearray(copy.read_bytes())
    data[-10] ^= 0xFF
    copy.write_bytes(bytes(data))
    with open_slide(copy) as c, open_slide(path) as a:
        assert c.fingerprint != a.fingerprint


def test_mpp_argument_overrides_metadata(svs):
    path, _ = svs
    with open_slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.metadata_mpp == pytest.approx(0.5)
        assert s.downsample_for(1.0) == 4.0
    with pytest.raises(UsageError, match="--mpp"):
        open_slide(path, mpp=-1)


# ---------------------------------------------------------------------- resampling
@pytest.mark.parametrize("working_mpp", [0.25, 0.5, 0.37, 0.61, 1.3, 2.9])
def test_resampling_keeps_a_linear_ramp_linear(ramp, working_mpp):
    """Output pixel i is centred on source position (x + i + 0.5) * d - 0.5 (no shift)."""
    path, _ = ramp
    with open_slide(path) as s:
        assert s.backend == "image" and s.mpp == pytest.approx(0.25)
        d = s.downsample_for(working_mpp)
        x, y = 7, 5
        w, h = min(120, int(1600 / d) - x - 2), min(90, int(1200 / d) - y - 2)  # inside the image
        got = s.read_working(x, y, w, h, working_mpp)[..., 0].astype(float)
        cx = (x + np.arange(w) + 0.5) * d - 0.5
        cy = (y + np.arange(h) + 0.5) * d - 0.5
        ref = 0.1 * cx[None, :] + 0.05 * cy[:, None]
        assert np.abs(got - ref).max() <= 1.0 + 1e-9
        assert (s.read_working(x, y, w, h, working_mpp)[..., 0] == s.read_working(x, y, w, h, working_mpp)[..., 2]).all()


@pytest.mark.parametrize("working_mpp", [0.7, 1.3, 3.1])
def test_overlapping_reads_agree_exactly(ramp, working_mpp):
    path, _ = ramp
    with open_slide(path) as s:
        a = s.read_working(10, 10, 200, 150, working_mpp)
        b = s.read_working(90, 60, 200, 150, working_mpp)
        np.testing.assert_array_equal(a[50:, 80:], b[:100, :120])


def test_snapping_to_whole_number_downsamples(svs):
    path, _ = svs
    with open_slide(path, mpp=0.2527) as s:
        assert s.resolve_working_mpp(0.5) == pytest.approx(0.5054)  # 1.98 -> 2
        assert s.downsample_for(s.resolve_working_mpp(0.5)) == 2.0
    with open_slide(path, mpp=0.3) as s:
        assert s.resolve_working_mpp(0.5) == pytest.approx(0.5)  # 1.67: resampled


# ---------------------------------------------------------------------- plain images
def test_plain_png_gray_rgba_and_no_mpp(tmp_path):
    import skimage.io

    gray = (np.arange(64 * 80).reshape(64, 80) % 251).astype(np.uint8)
    skimage.io.imsave(tmp_path / "g.png", gray, check_contrast=False)
    with open_slide(tmp_path / "g.png") as s:
        assert s.backend == "image" and s.mpp is None and s.dimensions == (80, 64)
        np.testing.assert_array_equal(s.read_region(0, 0, 80, 64), np.repeat(gray[..., None], 3, axis=2))
        assert s.downsample_for(None) == 1.0
        with pytest.raises(InputError, match="no pixel size.*--mpp"):
            s.downsample_for(0.5)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = (200, 50, 10)
    rgba[:, :15, 3] = 255  # left half opaque, right half transparent
    skimage.io.imsave(tmp_path / "a.png", rgba, check_contrast=False)
    with open_slide(tmp_path / "a.png") as s:
        px = s.read_region(0, 0, 30, 20)
        assert tuple(px[5, 5]) == (200, 50, 10) and tuple(px[5, 25]) == (255, 255, 255)


def test_plain_jpeg(tmp_path):
    import skimage.io

    img = np.zeros((40, 50, 3), np.uint8)
    img[:] = (180, 120, 160)
    skimage.io.imsave(tmp_path / "x.jpg", img, check_contrast=False)
    with open_slide(tmp_path / "x.jpg") as s:
        assert s.dimensions == (50, 40)
        assert np.abs(s.read_region(0, 0, 50, 40).astype(int) - img).max() <= 3


def test_16bit_tiff_percentile_scaling(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(1000, 5000, (256, 300), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "f.tif", img)
    with open_slide(tmp_path / "f.tif") as s:
        out = s.read_region(0, 0, 300, 256)[..., 0].astype(int)
        lo, hi = np.percentile(img, [0.5, 99.5])
        ref = np.clip(np.round((img.astype(np.float64) - lo) * 255.0 / (hi - lo)), 0, 255)
        assert np.abs(out - ref).max() <= 1
        assert (out[img <= lo] == 0).all() and (out[img >= hi] == 255).all()


def test_large_plain_tiff_is_read_lazily(tmp_path):
    """A region of a big compressed TIFF is read without decoding the whole image."""
    import tracemalloc

    h, w = 8192, 8192
    tile = np.full((256, 256), 7, np.uint8)
    tifffile.imwrite(tmp_path / "big.tif", (tile for _ in range((h // 256) * (w // 256))),
                     shape=(h, w), dtype=np.uint8, tile=(256, 256), compression="zlib")
    with open_slide(tmp_path / "big.tif") as s:
        tracemalloc.start()
        block = s.read_region(4000, 4000, 300, 300)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert (block == 7).all()
    assert peak < 8e6, peak  # the decoded image would be 64 MB (200 MB as RGB)


def test_dark_field_image_gets_black_background(tmp_path):
    img = np.zeros((200, 200), np.uint16)
    img[80:120, 80:120] = 4000
    tifffile.imwrite(tmp_path / "fl.tif", img)
    with open_slide(tmp_path / "fl.tif") as s:
        assert s.dark_background and s.background == (0, 0, 0)
        assert (s.read_region(190, 190, 30, 30) == 0).all()


# ---------------------------------------------------------------------- bad files
def _bad_files(tmp: Path, svs_path: Path) -> dict[str, Path]:
    (tmp / "folder").mkdir()
    (tmp / "empty.svs").write_bytes(b"")
    (tmp / "notes.svs").write_text("this is not a slide\n")
    data = svs_path.read_bytes()
    (tmp / "cut.svs").write_bytes(data[: len(data) // 2])
    (tmp / "data.npy").write_bytes(b"\x93NUMPY" + b"\x00" * 100)
    return {
        "missing": tmp / "nope.svs",
        "directory": tmp / "folder",
        "zero-byte": tmp / "empty.svs",
        "text named .svs": tmp / "notes.svs",
        "truncated": tmp / "cut.svs",
        "unsupported": tmp / "data.npy",
    }


@pytest.mark.parametrize("case", ["missing", "directory", "zero-byte", "text named .svs", "truncated", "unsupported"])
def test_bad_files_raise_one_line_input_errors(svs, tmp_path, case):
    path = _bad_files(tmp_path, svs[0])[case]
    with pytest.raises(InputError) as info:
        open_slide(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg


def test_truncated_real_svs(cmu_slide, tmp_path):
    data = cmu_slide.read_bytes()
    cut = tmp_path / "CMU-cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        open_slide(cut)
