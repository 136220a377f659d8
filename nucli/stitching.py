"""Per-tile instances -> global nuclei, each exactly once (streaming).

Ownership (decided in :mod:`nucli.tiling.grid`): a nucleus belongs to the tile
whose *core* contains its centroid (working px, pixel ``(c, r)`` covering
``[c, c+1) x [r, r+1)``). A nucleus touching an interior edge of a tile is cut
there and never taken from that tile; if its centroid is nevertheless in the
tile's core it is wider than the overlap can hold -> :class:`ProcessingError`
naming ``--overlap``. Padding beyond the image is owned by no tile.

A final pass removes any residual overlap between nuclei from different tiles
(a method may split one nucleus differently in two tiles): when two polygons
intersect by more than half of the smaller one, the smaller is dropped (ties:
the later one). It runs on a sliding band of tile rows with a shapely STRtree
and counts removals (with a method that is consistent across tiles: 0).

Geometry leaves here in **level-0 pixel coordinates** (working coordinates
times the downsample, origin at the slide's top-left). Nuclei are produced row
of tiles by row of tiles and handed to *sinks* (the exporters) as soon as no
later tile can touch them, so memory holds about two rows of tiles of nuclei.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from nucli.errors import ProcessingError, StoreError
from nucli.tiling.grid import TileGrid, spread
from nucli.tiling.store import RunStore

log = logging.getLogger(__name__)

UUID_NAMESPACE = uuid.UUID("5b0f3a53-6f0e-4d1c-9a7e-6e75636c6930")
OVERLAP_FRACTION = 0.5


@dataclass(frozen=True)
class Frame:
    """What exporters need to know about the slide and the run."""

    level0_size: tuple[int, int]  # (W0, H0)
    working_size: tuple[int, int]  # (W, H)
    downsample: float  # level-0 px per working px
    um_per_px: float | None  # µm per working px (None: unknown)
    source_mpp: float | None  # µm per level-0 px
    fingerprint: str
    brightfield: bool
    has_scores: bool
    tile_size: int
    overlap: int
    method: str | None = None
    source_path: str | None = None
    min_hematoxylin_od: float = 0.0  # brightfield: nuclei paler than this are not exported (the method's setting)
    background: tuple[float, float, float] = (255.0, 255.0, 255.0)  # brightfield: the glass colour (sampled tiles)


@dataclass
class Nucleus:
    """One global nucleus (geometry at working resolution + level-0 polygon)."""

    uid: str
    tile: int
    row: int
    col: int
    tile_label: int
    x0: int  # working px, top-left of ``mask``
    y0: int
    mask: np.ndarray  # bool (h, w)
    polygon: Any  # shapely Polygon, level-0 px
    measurements: dict[str, float]
    score: float | None = None
    label: int = 0  # global id (label image value), set when emitted
    cell: Any = None  # shapely Polygon, level-0 px: the cell grown from this nucleus (--objects cells)
    classification: str | None = None  # e.g. "Positive" (--positivity); None: the default class

    @property
    def y1(self) -> int:
        return self.y0 + self.mask.shape[0]

    @property
    def order(self) -> tuple[int, int, int]:
        return (self.row, self.col, self.tile_label)


@dataclass
class TileView:
    """A tile's pixels and owned region, for sinks that draw the slide (overlay)."""

    index: int
    row: int
    col: int
    origin: tuple[int, int]  # (x, y) working px
    core: tuple[int, int, int, int]  # owned pixels (c0, r0, c1, r1), tile-local, half-open
    pixels: np.ndarray  # (h, w, 3) uint8, in-image part


class Sink:
    """An exporter fed by :func:`stitch_store`. Override what you need."""

    def open(self, frame: Frame) -> None:  # noqa: B027 - optional hook
        pass

    def add_tile(self, view: TileView) -> None:  # noqa: B027
        pass

    def add(self, nucleus: Nucleus) -> None:  # noqa: B027
        pass

    def flush(self, y_final: float) -> None:  # noqa: B027
        """Every nucleus still to come lies at working y >= ``y_final``."""

    def close(self) -> None:  # noqa: B027
        pass

    def abort(self) -> None:  # noqa: B027
        pass


@dataclass
class StitchStats:
    nuclei: int = 0
    residual_overlaps_removed: int = 0
    tiles: int = 0
    tissue_px: int = 0  # working px
    tissue_area_um2: float | None = None
    tissue_area_level0_px2: float = 0.0
    seconds: float = 0.0
    brightfield: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def density_per_mm2(self) -> float | None:
        if not self.tissue_area_um2:
            return None
        return self.nuclei / (self.tissue_area_um2 / 1e6)


# --------------------------------------------------------------------------- frame


def frame_of(store: RunStore, sample_tiles: int = 9) -> Frame:
    """The slide geometry recorded in ``store``, and its modality (sampled from tiles)."""
    from nucli.postprocess import BRIGHTFIELD, detect_polarity, glass_colour

    m = store.meta
    try:
        w, h = (int(v) for v in m["working_size"])
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"{store.path}: run store metadata is damaged (working_size missing)") from None
    d = float(m.get("downsample") or 1.0)
    l0 = m.get("level0_size") or [round(w * d), round(h * d)]
    src_mpp = m.get("source_mpp")
    src_mpp = float(src_mpp) if src_mpp else None
    um = src_mpp * d if src_mpp else (float(m["working_mpp"]) if m.get("working_mpp") else None)
    source = m.get("source") or {}
    fingerprint = str(source.get("fingerprint") or source.get("path") or store.path.name)
    n = store.n_tiles
    polarity = BRIGHTFIELD
    glass = (255.0, 255.0, 255.0)
    if n:
        grid = store.grid
        idx = store.indices()
        picks = spread(n, sample_tiles)
        samples = []
        for i in picks:
            ew, eh = grid.extent(int(idx[i][0]), int(idx[i][1]))
            samples.append(store.read_tile(i)[:eh:4, :ew:4].reshape(-1, 3))
        sampled = np.concatenate(samples)
        polarity = detect_polarity(sampled[None])
        glass = glass_colour(sampled)
    stage = store.stage_meta("segment") or {}
    return Frame(
        level0_size=(int(l0[0]), int(l0[1])),
        working_size=(w, h),
        downsample=d,
        um_per_px=um,
        source_mpp=src_mpp,
        fingerprint=fingerprint,
        brightfield=polarity == BRIGHTFIELD,
        has_scores=store.has("scores"),
        tile_size=store.tile_size,
        overlap=int(m.get("overlap", 0)),
        method=stage.get("method"),
        source_path=source.get("path"),
        min_hematoxylin_od=_min_hematoxylin(stage),
        background=glass,
    )


def _min_hematoxylin(stage: dict) -> float:
    """The segmenting method's ``min_hematoxylin_od`` setting (0: none), from the store's stage record."""
    try:
        return max(float(((stage.get("config") or {}).get("params") or {}).get("min_hematoxylin_od") or 0.0), 0.0)
    except (TypeError, ValueError, AttributeError):
        return 0.0


# --------------------------------------------------------------------------- per tile


def polygon_of(mask: np.ndarray, x0: float, y0: float) -> Any:
    """Outline of a bool mask as a valid shapely Polygon in working px (largest part, no holes).

    Marching squares at level 0.5 through pixel centres: rasterising the polygon
    at pixel centres gives back the mask.
    """
    import shapely
    from shapely.geometry import Polygon
    from shapely.geometry.polygon import orient
    from skimage.measure import find_contours

    padded = np.pad(np.asarray(mask, np.uint8), 1)
    contours = find_contours(padded, 0.5, fully_connected="high")
    if not contours:
        return None

    def ring_area(c: np.ndarray) -> float:
        y, x = c[:, 0], c[:, 1]
        return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0

    best = max(contours, key=ring_area)
    xy = np.stack([best[:, 1] - 0.5 + x0, best[:, 0] - 0.5 + y0], axis=1)
    poly = Polygon(xy)
    if not poly.is_valid:
        poly = _largest_polygon(shapely.make_valid(poly))
        if poly is None:
            return None
    poly = Polygon(poly.exterior).simplify(0.0)
    if poly.is_empty or poly.geom_type != "Polygon":
        return None
    return orient(poly, sign=1.0)


def _largest_polygon(geom: Any) -> Any:
    from shapely.geometry import Polygon

    if geom.geom_type == "Polygon":
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon) or g.geom_type == "MultiPolygon"]
    polys = []
    for g in parts:
        polys.extend(g.geoms if g.geom_type == "MultiPolygon" else [g])
    polys = [p for p in polys if p.area > 0]
    return max(polys, key=lambda p: p.area) if polys else None


def _core_local(grid: TileGrid, row: int, col: int, origin: tuple[int, int], w: int, h: int) -> tuple[int, ...]:
    """Owned pixel range of a tile, tile-local: pixel c is owned when c + 0.5 is in the core."""
    x0, y0, x1, y1 = grid.core(row, col)
    ox, oy = origin

    def rng(lo: float, hi: float, o: int, n: int) -> tuple[int, int]:
        a = min(max(math.ceil(lo - 0.5 - o), 0), n)
        b = min(max(math.ceil(hi - 0.5 - o), 0), n)
        return a, b

    c0, c1 = rng(x0, x1, ox, w)
    r0, r1 = rng(y0, y1, oy, h)
    return c0, r0, c1, r1


def nucleus_uid(fingerprint: str, row: int, col: int, tile_label: int, x0: int, y0: int,
                mask: np.ndarray) -> str:
    """Deterministic UUID (v5) from the slide, the tile, and the nucleus' pixels."""
    import hashlib

    digest = hashlib.sha1(np.packbits(np.ascontiguousarray(mask, bool)).tobytes()).hexdigest()[:16]
    name = f"{fingerprint}|{row},{col}|{tile_label}|{x0},{y0},{mask.shape[1]}x{mask.shape[0]}|{digest}"
    return str(uuid.uuid5(UUID_NAMESPACE, name))


def tile_nuclei(
    labels: np.ndarray,
    pixels: np.ndarray,
    *,
    index: int,
    row: int,
    col: int,
    origin: tuple[int, int],
    grid: TileGrid,
    frame: Frame,
    scores: np.ndarray | None = None,
) -> list[Nucleus]:
    """The nuclei a tile owns (``labels``/``pixels`` already cut to the in-image extent)."""
    import shapely
    from scipy import ndimage as ndi

    from nucli.export.measurements import measurements_from_stats
    from nucli.postprocess import BRIGHTFIELD, FLUORESCENCE, is_blank, is_pale_pink, nucleus_channel

    labels = np.asarray(labels)
    n = int(labels.max(initial=0))
    if n == 0:
        return []
    h, w = labels.shape
    ox, oy = int(origin[0]), int(origin[1])
    rr, cc = np.nonzero(labels)
    ids = labels[rr, cc]
    cnt = np.bincount(ids, minlength=n + 1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.bincount(ids, weights=cc, minlength=n + 1) / cnt + 0.5 + ox
        cy = np.bincount(ids, weights=rr, minlength=n + 1) / cnt + 0.5 + oy
    present = cnt > 0
    present[0] = False
    owned = present & grid.owns(row, col, np.nan_to_num(cx, nan=-1.0), np.nan_to_num(cy, nan=-1.0))
    if not owned.any():
        return []
    left, top, right, bottom = grid.interior_edges(row, col)
    slices = ndi.find_objects(labels)
    for lab in np.flatnonzero(owned):
        sl = slices[lab - 1]
        if (left and sl[1].start == 0) or (top and sl[0].start == 0) or (right and sl[1].stop == w) or (
            bottom and sl[0].stop == h
        ):
            _too_big(sl, cx[lab], cy[lab], frame)
    px = np.asarray(pixels)[rr, cc]  # the nucleus pixels only: the channel is computed per pixel
    channel = nucleus_channel(px[None], BRIGHTFIELD if frame.brightfield else FLUORESCENCE)[0]
    # every measurement of every nucleus of the tile at once (sums over the label image, no per-nucleus loop)
    stats = _label_stats(ids, rr, cc, cnt, channel, n)
    if frame.brightfield and frame.min_hematoxylin_od > 0:
        safe = np.maximum(cnt, 1.0)
        r, g, b = (np.bincount(ids, weights=px[:, k].astype(np.float64), minlength=n + 1) / safe for k in range(3))
        # pink with little hematoxylin on H&E: stroma or cytoplasm (the method's setting); as bright as the
        # glass: not a stained nucleus
        owned &= ~(is_pale_pink(stats["channel_mean"], r, g, b, frame.min_hematoxylin_od)
                   | is_blank(r, g, b, frame.background))
    labs = np.flatnonzero(owned)
    if not len(labs):
        return []
    masks = [labels[slices[lab - 1]] == lab for lab in labs]
    corners = [(slices[lab - 1][1].start + ox, slices[lab - 1][0].start + oy) for lab in labs]
    polys = outlines(masks, corners, frame.downsample)
    d = frame.downsample
    area = shapely.area(polys) / (d * d)
    length = shapely.length(polys) / d
    hull = shapely.area(shapely.convex_hull(polys)) / (d * d)
    # centroids as the mean of tile-local pixel coordinates (exact integer sums), plus the corner
    sx, sy = np.bincount(ids, weights=cc, minlength=n + 1)[labs], np.bincount(ids, weights=rr, minlength=n + 1)[labs]
    xs = np.array([c[0] - ox for c in corners], np.float64)
    ys = np.array([c[1] - oy for c in corners], np.float64)
    nk = cnt[labs]
    cx_k = (sx - nk * xs) / nk + 0.5 + (xs + ox)
    cy_k = (sy - nk * ys) / nk + 0.5 + (ys + oy)
    meas_all = measurements_from_stats(stats, labs, cx_k, cy_k, polygon_area_w=area, perimeter_w=length,
                                       polygon_hull_area_w=hull, downsample=d, um_per_px=frame.um_per_px)
    out: list[Nucleus] = []
    for k, lab in enumerate(labs):
        poly0 = polys[k]
        if poly0 is None:
            continue
        mask = masks[k]
        x0, y0 = corners[k]
        score = None
        if scores is not None and lab < len(scores) and not math.isnan(float(scores[lab])):
            score = float(scores[lab])
        out.append(Nucleus(uid=nucleus_uid(frame.fingerprint, row, col, int(lab), x0, y0, mask), tile=index,
                           row=row, col=col, tile_label=int(lab), x0=x0, y0=y0, mask=mask, polygon=poly0,
                           measurements=meas_all[k], score=score))
    return out


def _label_stats(ids: np.ndarray, rr: np.ndarray, cc: np.ndarray, cnt: np.ndarray, values: np.ndarray,
                 n: int) -> dict[str, np.ndarray]:
    """Per-label pixel statistics of a label image, indexed by label: centred second moments of the pixel
    coordinates and the mean / standard deviation of ``values`` (the nucleus channel at each pixel)."""
    safe = np.maximum(cnt, 1.0)

    def mean(weights: np.ndarray) -> np.ndarray:
        return np.bincount(ids, weights=weights, minlength=n + 1) / safe

    dx = cc - mean(cc)[ids]
    dy = rr - mean(rr)[ids]
    v = values.astype(np.float64)
    vm = mean(v)
    dv = v - vm[ids]
    return {"mxx": mean(dx * dx), "myy": mean(dy * dy), "mxy": mean(dx * dy), "channel_mean": vm,
            "channel_std": np.sqrt(mean(dv * dv)), "count": cnt}


def outlines(masks: Sequence[np.ndarray], corners: Sequence[tuple[int, int]], downsample: float) -> list[Any]:
    """Level-0 outlines on QuPath's 0.01 px grid of many nuclei: for each bool mask (top-left pixel at working
    ``corners[k]``) the polygon of :func:`polygon_of`, scaled by ``downsample`` and rounded as
    :func:`~nucli.export.qupath_grid.snap` does (None where an outline collapses). The marching squares run
    per mask; building, checking, simplifying, orienting and rounding the polygons run on all of them at once."""
    import shapely
    from skimage.measure import find_contours

    from nucli.export.qupath_grid import DECIMALS, snap

    d = float(downsample)
    rings: list[np.ndarray] = []
    for mask, (x0, y0) in zip(masks, corners):
        h, w = mask.shape
        padded = np.zeros((h + 2, w + 2), np.uint8)
        padded[1:-1, 1:-1] = mask
        contours = find_contours(padded, 0.5, fully_connected="high")
        if not contours:
            rings.append(None)
            continue
        best = contours[0] if len(contours) == 1 else max(contours, key=_ring_area)
        rings.append(np.stack([best[:, 1] - 0.5 + x0, best[:, 0] - 0.5 + y0], axis=1))
    out: list[Any] = [None] * len(rings)
    todo = [k for k, r in enumerate(rings) if r is not None and len(r) >= 4]
    if not todo:
        return out
    coords = np.concatenate([rings[k] for k in todo])
    index = np.repeat(np.arange(len(todo)), [len(rings[k]) for k in todo])
    polys = shapely.polygons(shapely.linearrings(coords, indices=index))
    valid = shapely.is_valid(polys)
    polys = shapely.simplify(polys, 0.0)
    ok = valid & (shapely.get_type_id(polys) == 3) & ~shapely.is_empty(polys)
    polys = shapely.orient_polygons(polys, exterior_cw=False)
    scale = (lambda c: np.round(c * d, DECIMALS)) if d != 1.0 else (lambda c: np.round(c, DECIMALS))
    level0 = shapely.transform(polys, scale)
    fine = ok & shapely.is_valid(level0) & (shapely.area(level0) > 0)
    level0 = shapely.orient_polygons(level0, exterior_cw=False)
    for j, k in enumerate(todo):
        if fine[j]:
            out[k] = level0[j]
            continue
        # the rare outline that needs a repair: the one-nucleus path
        mask, (x0, y0) = masks[k], corners[k]
        poly_w = polygon_of(mask, x0, y0)
        if poly_w is not None:
            out[k] = snap(shapely.transform(poly_w, lambda c: c * d) if d != 1.0 else poly_w)
    return out


def _ring_area(c: np.ndarray) -> float:
    y, x = c[:, 0], c[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0


def _too_big(sl: tuple[slice, slice], cx: float, cy: float, frame: Frame) -> None:
    extent = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
    suggest = int(math.ceil(max(extent * 1.5, frame.overlap + 16) / 16.0) * 16)
    d = frame.downsample
    raise ProcessingError(
        f"a nucleus near level-0 ({cx * d:.0f}, {cy * d:.0f}) is cut by a tile edge although the tile owns it: "
        f"it is larger than the tile overlap ({frame.overlap} px) can hold; re-tile with a larger --overlap "
        f"(e.g. --overlap {suggest}) or lower the method's maximum nucleus size"
    )


# --------------------------------------------------------------------------- the band


class _Band:
    """Nuclei accepted but not yet emitted; resolves residual overlaps with an STRtree."""

    def __init__(self) -> None:
        self.active: list[Nucleus] = []

    def add(self, candidates: list[Nucleus]) -> int:
        if not candidates:
            return 0
        from shapely import STRtree

        pool = self.active + candidates
        geoms = [n.polygon for n in pool]
        areas = np.array([g.area for g in geoms])
        tree = STRtree(geoms)
        accepted = [True] * len(self.active) + [False] * len(candidates)
        removed = 0
        for k in range(len(self.active), len(pool)):
            keep = True
            for j in sorted(int(v) for v in tree.query(geoms[k], predicate="intersects")):
                if j == k or not accepted[j]:
                    continue
                inter = geoms[k].intersection(geoms[j]).area
                if inter > OVERLAP_FRACTION * min(areas[k], areas[j]):
                    removed += 1
                    if areas[k] <= areas[j]:
                        keep = False
                        break
                    accepted[j] = False
            accepted[k] = keep
        self.active = [n for n, a in zip(pool, accepted) if a]
        return removed

    def pop_final(self, y_next: float) -> tuple[list[Nucleus], float]:
        """Nuclei no later tile (all at y >= ``y_next``) can overlap, in output order; and the watermark."""
        final = [n for n in self.active if n.y1 <= y_next]
        self.active = [n for n in self.active if n.y1 > y_next]
        final.sort(key=lambda n: n.order)
        watermark = min([y_next] + [n.y0 for n in self.active])
        return final, watermark


# --------------------------------------------------------------------------- driver


def usable_cpus(limit: int | None = None) -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a SLURM allocation), at most ``limit``."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, limit) if limit else n)


def ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], threads: int, ahead: int | None = None
                ) -> Iterator[Any]:
    """``map(fn, items)`` on ``threads`` threads, in order, at most ``ahead`` results (default 2 per
    thread) computed ahead of the consumer (memory stays bounded). One thread: plain ``map``."""
    if threads <= 1 or len(items) < 2:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    ahead = max(threads, int(ahead or 2 * threads))
    pending: deque = deque()
    it = iter(items)
    with ThreadPoolExecutor(threads, thread_name_prefix="nucli-stitch") as pool:
        try:
            for item in it:
                pending.append(pool.submit(fn, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def stitch_store(store: RunStore, sinks: Sequence[Sink] = (), *, progress: bool = True,
                 threads: int | None = None) -> StitchStats:
    """Stitch the segmented tiles of ``store`` and feed every global nucleus to ``sinks``.

    Each tile's own work (reading it, its tissue area, the outlines and measurements of the nuclei
    it owns) runs on ``threads`` threads (default: the usable CPUs, at most 4), a few tiles ahead
    of the merge, which takes the tiles in order and feeds the sinks on the calling thread: the
    output is the same for any number of threads.
    """
    from nucli.pipeline import LABELS, SCORES, STAGE, track
    from nucli.postprocess import BRIGHTFIELD, FLUORESCENCE, tissue_pixels

    start = time.perf_counter()
    n_tiles = store.n_tiles
    done = store.done(STAGE)
    if not store.has(LABELS) or not done.all():
        missing = int((~done).sum())
        raise StoreError(
            f"{store.path}: {missing} of {n_tiles} tiles are not segmented yet; "
            f"run `nucli segment {store.path} --method NAME -o OUT` first"
        )
    for name, stage, redo in ((LABELS, STAGE, "segment"), ("tiles", "tile", "tile")):
        lost = store.lost_tiles(name, stage)
        if len(lost):
            raise StoreError(f"{store.path}: the {name} of {len(lost)} tiles are missing (files deleted from the "
                             f"store); rerun `nucli {redo}` with the same options to compute them again")
    frame = frame_of(store)
    grid = store.grid
    idx = store.indices()
    origins = store.origins()
    labels_arr = store.array(LABELS)
    scores_arr = store.array(SCORES) if frame.has_scores else None
    polarity = BRIGHTFIELD if frame.brightfield else FLUORESCENCE
    stats = StitchStats(tiles=n_tiles, brightfield=frame.brightfield)
    threads = usable_cpus(4) if threads is None else max(1, int(threads))

    order = sorted(range(n_tiles), key=lambda i: (int(idx[i][0]), int(idx[i][1])))
    rows: dict[int, list[int]] = {}
    for i in order:
        rows.setdefault(int(idx[i][0]), []).append(i)
    row_keys = sorted(rows)

    opened: list[Sink] = []
    prepared: Iterator[tuple[TileView, int, list[Nucleus]]] | None = None
    try:
        for s in sinks:
            opened.append(s)  # before open(): a sink that fails while opening removes what it began
            s.open(frame)
        band = _Band()
        next_label = 1

        def emit(nuclei: Iterable[Nucleus]) -> None:
            nonlocal next_label
            for nucleus in nuclei:
                nucleus.label = next_label
                next_label += 1
                for s in sinks:
                    s.add(nucleus)

        def prepare(i: int) -> tuple[TileView, int, list[Nucleus]]:
            """A tile's own work (read, tissue, outlines, measurements): independent of the others."""
            row, col = int(idx[i][0]), int(idx[i][1])
            w, h = grid.extent(row, col)
            origin = (int(origins[i][0]), int(origins[i][1]))
            pixels = store.read_tile(i)[:h, :w]
            labels = np.asarray(labels_arr[i])[:h, :w]
            scores = np.asarray(scores_arr[i]) if scores_arr is not None else None
            core = _core_local(grid, row, col, origin, w, h)
            tissue = int(tissue_pixels(pixels[core[1]:core[3], core[0]:core[2]], polarity).sum())
            nuclei = tile_nuclei(labels, pixels, index=i, row=row, col=col, origin=origin, grid=grid, frame=frame,
                                 scores=scores)
            return TileView(i, row, col, origin, core, pixels), tissue, nuclei

        prepared = ordered_map(prepare, [i for r in row_keys for i in rows[r]], threads)
        with track(total=n_tiles, description="Stitching", enabled=progress) as advance:
            for k, r in enumerate(row_keys):
                candidates: list[Nucleus] = []
                for _ in rows[r]:
                    view, tissue, nuclei = next(prepared)
                    stats.tissue_px += tissue
                    for s in sinks:
                        s.add_tile(view)
                    candidates.extend(nuclei)
                    advance(1)
                stats.residual_overlaps_removed += band.add(candidates)
                y_next = float(grid.ys[row_keys[k + 1]]) if k + 1 < len(row_keys) else math.inf
                final, watermark = band.pop_final(y_next)
                emit(final)
                stats.nuclei += len(final)
                for s in sinks:
                    s.flush(watermark)
        prepared.close()
        for s in sinks:
            s.close()
    except BaseException:
        if prepared is not None:
            prepared.close()  # cancels the tiles not started, waits for the running ones
        for s in opened:
            try:
                s.abort()
            except Exception:  # noqa: BLE001 - keep the original error
                log.debug("abort of %r failed", s, exc_info=True)
        raise
    d = frame.downsample
    stats.tissue_area_level0_px2 = stats.tissue_px * d * d
    stats.tissue_area_um2 = stats.tissue_px * frame.um_per_px**2 if frame.um_per_px else None
    stats.seconds = time.perf_counter() - start
    if stats.residual_overlaps_removed:
        log.info("stitch: removed %d residual overlaps between tiles", stats.residual_overlaps_removed)
    return stats
