"""Seam-exact stitching: tile a label image, segment with a method that returns each tile's
crop, stitch -> exactly the original nuclei (IoU 1 each, none missing, none doubled)."""

from __future__ import annotations

import numpy as np
import pytest

from nucli.errors import ProcessingError, StoreError
from nucli.export.labels import LabelImageSink
from nucli.models.base import Method, MethodConfig, TileResult
from nucli.pipeline import segment_store, store_from_array
from nucli.stitching import Sink, polygon_of, stitch_store
from nucli.tiling.grid import TileGrid


# ----------------------------------------------------------------------------- helpers
def encode(labels: np.ndarray) -> np.ndarray:
    """Label image -> RGB whose 24 bits carry the label (the fake method decodes it)."""
    lab = labels.astype(np.uint32)
    return np.stack([lab & 255, (lab >> 8) & 255, (lab >> 16) & 255], axis=-1).astype(np.uint8)


class CropMethod(Method):
    """Returns each tile's labels exactly (decoded from the pixels), with a score per label."""

    def __init__(self, max_diameter: int = 64):
        super().__init__(MethodConfig(name="crop", max_nucleus_diameter_px=max_diameter, batch_size=3))

    def postprocess(self, raw):
        out = []
        for t in np.asarray(raw):
            t = t.astype(np.int64)
            lab = (t[..., 0] + (t[..., 1] << 8) + (t[..., 2] << 16)).astype(np.int32)
            ids = np.unique(lab)
            out.append(TileResult(lab, scores={int(i): float(i) / 1000.0 for i in ids if i}))
        return out


class Collect(Sink):
    def __init__(self):
        self.nuclei = []

    def add(self, nucleus):
        self.nuclei.append(nucleus)


def _draw_ellipse(labels, cy, cx, ry, rx, angle, lab):
    from skimage.draw import ellipse

    rr, cc = ellipse(cy, cx, ry, rx, shape=labels.shape, rotation=angle)
    if len(rr) == 0 or labels[rr, cc].any():
        return False
    labels[rr, cc] = lab
    return True


def ellipse_image(width, height, tile, overlap, *, n=2500, seed=0, r_max=None):
    """Non-overlapping ellipses (touching allowed), seeded first on every seam and core corner."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.int32)
    r_max = r_max or max(3.0, min(14.0, overlap * 0.3))
    grid = TileGrid(width, height, tile, overlap)
    seams_x = sorted({grid.core(0, c)[2] for c in range(grid.shape[1] - 1)})
    seams_y = sorted({grid.core(r, 0)[3] for r in range(grid.shape[0] - 1)})
    points = [(y, x) for y in seams_y for x in seams_x]  # core corners
    points += [(rng.uniform(0, height), x) for x in seams_x for _ in range(8)]
    points += [(y, rng.uniform(0, width)) for y in seams_y for _ in range(8)]
    points += [(0, rng.uniform(0, width)), (height - 1, rng.uniform(0, width))]  # image borders
    lab = 1
    for y, x in points:
        if _draw_ellipse(labels, y, x, rng.uniform(3, r_max), rng.uniform(3, r_max), rng.uniform(0, np.pi), lab):
            lab += 1
    tries = 0
    while lab <= n and tries < 20 * n:
        tries += 1
        if _draw_ellipse(labels, rng.uniform(0, height), rng.uniform(0, width), rng.uniform(2, r_max),
                         rng.uniform(2, r_max), rng.uniform(0, np.pi), lab):
            lab += 1
    return labels


def assert_same_nuclei(original: np.ndarray, stitched: np.ndarray) -> None:
    """Bijection between labels with identical pixel sets (IoU = 1 for every nucleus)."""
    fg = (original > 0) | (stitched > 0)
    pairs = np.unique(np.stack([original[fg], stitched[fg]], axis=1), axis=0)
    assert not (pairs == 0).any(), "a nucleus is missing or extra pixels appeared"
    assert len(np.unique(pairs[:, 0])) == len(pairs), "an original nucleus was split or doubled"
    assert len(np.unique(pairs[:, 1])) == len(pairs), "two originals were merged"
    assert len(pairs) == len(np.unique(original[original > 0]))


def stitch_in_memory(store):
    w, h = store.meta["working_size"]
    image = np.zeros((h, w), np.int32)
    collect = Collect()
    stats = stitch_store(store, [LabelImageSink(array=image, chunk=64), collect], progress=False)
    return image, collect.nuclei, stats


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize(
    "width,height,tile,overlap",
    [
        (1237, 1011, 256, 48),  # non-multiple sizes
        (911, 1303, 200, 40),
        (1500, 700, 512, 64),
        (400, 1100, 512, 64),  # narrower than one tile: padded, a single column
        (700, 650, 128, 60),  # overlap nearly half the tile
    ],
)
def test_round_trip_is_exact(tmp_path, width, height, tile, overlap):
    original = ellipse_image(width, height, tile, overlap, n=2500)
    assert original.max() > 1000
    store = store_from_array(tmp_path / "run.zarr", encode(original), tile_size=tile, overlap=overlap)
    segment_store(store, CropMethod(), progress=False)
    stitched, nuclei, stats = stitch_in_memory(store)

    assert_same_nuclei(original, stitched)
    assert stats.nuclei == len(nuclei) == original.max()
    assert stats.residual_overlaps_removed == 0
    # the method's score of each nucleus survives relabelling: score = original id / 1000
    for n in nuclei[:400]:
        orig_id = int(np.bincount(original[stitched == n.label]).argmax())
        assert n.score == pytest.approx(orig_id / 1000.0, rel=1e-6)
    assert len({n.uid for n in nuclei}) == len(nuclei)


def test_round_trip_with_downsample_scales_polygons(tmp_path):
    original = ellipse_image(600, 500, 256, 48, n=400, seed=3)
    store = store_from_array(tmp_path / "run.zarr", encode(original), tile_size=256, overlap=48, downsample=4.0,
                             source_mpp=0.25)
    segment_store(store, CropMethod(), progress=False)
    stitched, nuclei, _ = stitch_in_memory(store)
    assert_same_nuclei(original, stitched)
    for n in nuclei[:100]:
        minx, miny, maxx, maxy = n.polygon.bounds
        h, w = n.mask.shape
        assert (minx, miny) == (pytest.approx(n.x0 * 4.0, abs=2.0), pytest.approx(n.y0 * 4.0, abs=2.0))
        assert maxx <= (n.x0 + w) * 4.0 and maxy <= (n.y0 + h) * 4.0
        assert n.measurements["area_px2"] == pytest.approx(n.mask.sum() * 16.0)
        assert n.measurements["area_um2"] == pytest.approx(n.mask.sum() * 1.0)  # 0.25 µm * 4 = 1 µm/px


def test_polygons_rasterise_back_to_masks(tmp_path):
    import shapely

    original = ellipse_image(500, 400, 200, 40, n=300, seed=5)
    store = store_from_array(tmp_path / "run.zarr", encode(original), tile_size=200, overlap=40)
    segment_store(store, CropMethod(), progress=False)
    _, nuclei, _ = stitch_in_memory(store)
    for n in nuclei:
        h, w = n.mask.shape
        yy, xx = np.mgrid[0:h, 0:w]
        inside = shapely.contains_xy(n.polygon, xx + n.x0 + 0.5, yy + n.y0 + 0.5)
        assert (inside == n.mask).all()
        assert n.polygon.is_valid and n.polygon.exterior.is_ccw


def test_label_image_band_writer_matches_in_memory(tmp_path):
    import zarr

    original = ellipse_image(700, 900, 256, 48, n=600, seed=7)
    store = store_from_array(tmp_path / "run.zarr", encode(original), tile_size=256, overlap=48)
    segment_store(store, CropMethod(), progress=False)
    mem, _, _ = stitch_in_memory(store)
    out = tmp_path / "labels.zarr"
    stitch_store(store, [LabelImageSink(out, chunk=100)], progress=False)
    arr = zarr.open_array(str(out), mode="r")
    assert arr.chunks == (100, 100)
    assert (np.asarray(arr[:]) == mem).all()
    assert arr.attrs["nucli"]["kind"] == "label-image"


# ----------------------------------------------------------------------------- errors and conflicts
def test_nucleus_wider_than_overlap_names_the_option(tmp_path):
    labels = np.zeros((300, 500), np.int32)
    grid = TileGrid(500, 300, 256, 32)
    seam = grid.core(0, 0)[2]
    _draw_ellipse(labels, 150, seam - 6, 20, 30, 0.0, 1)  # 60 px wide, centroid in tile 0's core
    store = store_from_array(tmp_path / "run.zarr", encode(labels), tile_size=256, overlap=32)
    segment_store(store, CropMethod(), progress=False)
    with pytest.raises(ProcessingError, match="--overlap"):
        stitch_in_memory(store)


def test_residual_overlap_is_removed_and_counted(tmp_path):
    # tiles that disagree: the same nucleus shifted by 6 px in the second tile, so that
    # each tile finds its centroid inside its own core
    width, tile, overlap = 2 * 256 - 64, 256, 64
    grid = TileGrid(width, 200, tile, overlap)
    seam = grid.core(0, 0)[2]
    left = np.zeros((200, width), np.int32)
    _draw_ellipse(left, 100, seam - 3, 8, 8, 0.0, 1)
    right = np.zeros_like(left)
    _draw_ellipse(right, 100, seam + 3, 8, 8, 0.0, 1)
    store = store_from_array(tmp_path / "run.zarr", encode(left), tile_size=tile, overlap=overlap)
    x1 = grid.origin(0, 1)[0]
    tile1 = np.full((tile, tile, 3), 255, np.uint8)
    tile1[:200] = encode(right)[:, x1 : x1 + tile]
    store.write("tiles", 1, tile1)
    segment_store(store, CropMethod(), progress=False)
    _, nuclei, stats = stitch_in_memory(store)
    assert stats.residual_overlaps_removed == 1
    assert len(nuclei) == 1


def test_stitch_refuses_unsegmented_store(tmp_path):
    store = store_from_array(tmp_path / "run.zarr", np.full((300, 300, 3), 255, np.uint8), tile_size=128,
                             overlap=32)
    with pytest.raises(StoreError, match="not segmented"):
        stitch_store(store, [], progress=False)


def test_polygon_of_single_pixel_and_pinch():
    one = np.ones((1, 1), bool)
    p = polygon_of(one, 10, 20)
    assert p.is_valid and p.contains(__import__("shapely").Point(10.5, 20.5))
    pinch = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], bool)
    q = polygon_of(pinch, 0, 0)
    assert q.is_valid and q.geom_type == "Polygon" and q.area >= 2.0
