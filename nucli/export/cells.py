"""Cells grown from the stitched nuclei, and IHC positivity, between stitching and the exporters.

:class:`ObjectStage` sits between :func:`nucli.stitching.stitch_store` and the
exporters: it receives every global nucleus (and every tile's pixels), adds the
nucleus' DAB measurements and class (``--positivity dab``) and its cell
(``--objects cells``), then hands the nucleus on.

How a cell is grown (working pixels, pixel centres):

* every pixel within ``--cell-expansion`` µm of a nucleus pixel (Euclidean, the
  exact distance transform) may join that nucleus' cell; a pixel that several
  nuclei could take goes to the nearest one (ties: the nucleus whose centre is
  higher up, then further left), so touching cells split between them, as
  QuPath's cell expansion does, and no two cells share a pixel;
* expansion pixels must be tissue: brightfield pixels whose optical density is
  above 0.15 in the majority of their 5 x 5 neighbourhood (fluorescence: any
  analysed pixel); nothing outside the analysed tiles;
* the cell is the 4-connected part of those pixels holding the nucleus, and
  its outline follows pixel edges. Two cells therefore never overlap (their
  outlines share edges exactly, also after rounding to QuPath's 0.01 px grid),
  and the nucleus outline, which runs through the centres of its boundary pixels,
  lies inside its cell.

Seams: a cell depends only on the global nuclei and on each working pixel as
held by the tile whose core owns it, never on where tiles were cut. The stage
waits until no nucleus still to come can reach a cell (the stitcher's
watermark) before computing it, so a tiled run gives the cells of an untiled
one. Memory holds about three rows of tiles and the nuclei near them.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from nucli.errors import UsageError
from nucli.export.positivity import Positivity
from nucli.stitching import Sink

log = logging.getLogger("nucli.export")

DEFAULT_EXPANSION_UM = 5.0
MAX_EXPANSION_UM = 100.0
TISSUE_RADIUS = 2  # the 5 x 5 majority vote of the tissue mask
CHUNK = 1024  # working px: cells are computed in windows about this wide
CELL_CLASS = ("Cell", (0, 200, 0))
NUCLEUS_CLASS = ("Nucleus", (0, 200, 0))


@dataclass(frozen=True)
class ObjectOptions:
    """What each exported object is: a nucleus or a cell, classed by DAB positivity or not."""

    cells: bool = False
    expansion_um: float = DEFAULT_EXPANSION_UM
    positivity: Positivity | None = None

    @property
    def active(self) -> bool:
        return self.cells or self.positivity is not None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"objects": "cells" if self.cells else "detections"}
        if self.cells:
            out["cell_expansion_um"] = self.expansion_um
        return out


def object_options(objects: str | None = None, cell_expansion: float | None = None, positivity: str | None = None,
                   positivity_threshold: Any = None) -> ObjectOptions:
    """The CLI's ``--objects`` / ``--cell-expansion`` / ``--positivity`` / ``--positivity-threshold``; one-line errors."""
    from nucli.export.positivity import parse_positivity

    kind = "detections" if objects is None else str(getattr(objects, "value", objects)).lower()
    if kind not in ("detections", "cells"):
        raise UsageError(f"unknown --objects '{objects}'; choose detections or cells")
    if cell_expansion is not None and kind != "cells":
        raise UsageError("--cell-expansion grows cells: use it with --objects cells")
    e = DEFAULT_EXPANSION_UM if cell_expansion is None else float(cell_expansion)
    if not (e == e and 0.0 <= e <= MAX_EXPANSION_UM):
        raise UsageError(f"--cell-expansion is in µm, from 0 to {MAX_EXPANSION_UM:g}; got {cell_expansion}")
    pos = parse_positivity(None if positivity is None else str(getattr(positivity, "value", positivity)),
                           positivity_threshold)
    return ObjectOptions(cells=kind == "cells", expansion_um=e, positivity=pos)


def check_store(store: Any, options: ObjectOptions | None) -> None:
    """Refuse, before any work, what the slide cannot give: cells without a pixel size, DAB without DAB."""
    if options is None or not options.active:
        return
    from nucli.stitching import frame_of

    frame = frame_of(store)
    if options.cells and not frame.um_per_px:
        raise UsageError("--objects cells grows cells by --cell-expansion µm, but the slide has no pixel size; "
                         "pass --mpp (µm per pixel) when tiling")
    if options.positivity is not None:
        from nucli.export.positivity import stain_problem
        from nucli.tiling.grid import spread

        samples = []
        if store.n_tiles:
            grid, idx = store.grid, store.indices()
            for i in spread(store.n_tiles, 9):
                ew, eh = grid.extent(int(idx[i][0]), int(idx[i][1]))
                samples.append(store.read_tile(int(i))[:eh:2, :ew:2, :3])
        problem = stain_problem(samples, frame.brightfield)
        if problem:
            raise UsageError(problem)


# --------------------------------------------------------------------------- geometry


def pixel_outline(mask: np.ndarray, x0: float, y0: float) -> Any:
    """The outline along pixel edges of a 4-connected bool mask whose top-left pixel is ``(x0, y0)``.

    A shapely Polygon (holes kept) in the same units as ``x0``/``y0``; every edge is
    horizontal or vertical (the union of the mask's row runs).
    """
    import shapely

    m = np.asarray(mask, bool)
    p = np.pad(m, ((0, 0), (1, 1))).astype(np.int8)
    d = np.diff(p, axis=1)
    rs, cs = np.nonzero(d == 1)
    _, ce = np.nonzero(d == -1)  # same row-major order: the k-th start pairs with the k-th end
    poly = shapely.union_all(shapely.box(x0 + cs, y0 + rs, x0 + ce, y0 + rs + 1))
    if poly.geom_type != "Polygon":  # not 4-connected: keep the largest part
        poly = max(poly.geoms, key=lambda g: g.area)
    return shapely.simplify(poly, 0.0)


def _circularity(poly: Any) -> float:
    """QuPath's circularity: 4π · area / perimeter² of the exterior ring."""
    from shapely.geometry import Polygon

    ring = Polygon(poly.exterior)
    return 4.0 * math.pi * ring.area / (ring.length ** 2) if ring.length > 0 else 0.0


# --------------------------------------------------------------------------- the stage


class _Tile:
    def __init__(self, view: Any):
        self.index = view.index
        self.ox, self.oy = (int(v) for v in view.origin)
        self.pixels = view.pixels
        c0, r0, c1, r1 = view.core
        self.core = (self.ox + c0, self.oy + r0, self.ox + c1, self.oy + r1)  # working px, half-open
        self.bottom = self.oy + view.pixels.shape[0]
        self._dab: np.ndarray | None = None

    def dab(self) -> np.ndarray:
        if self._dab is None:
            from nucli.export.positivity import dab_od

            self._dab = dab_od(self.pixels)
        return self._dab


class ObjectStage(Sink):
    """Adds cells and/or DAB classes to each nucleus, then feeds ``sinks`` (see the module docstring)."""

    def __init__(self, sinks: Sequence[Sink], options: ObjectOptions):
        self.sinks = list(sinks)
        self.options = options
        self.queue: deque[Any] = deque()
        self.recent: list[Any] = []
        self.tiles: dict[int, _Tile] = {}
        self.counts: Counter[str] = Counter()
        self.cells = 0
        self.nuclei_outside_cell = 0
        self._opened: list[Sink] = []

    # ----------------------------------------------------------------- Sink
    def open(self, frame: Any) -> None:
        o = self.options
        if o.cells and not frame.um_per_px:
            raise UsageError("--objects cells grows cells by --cell-expansion µm, but the slide has no pixel size; "
                             "pass --mpp (µm per pixel) when tiling")
        if o.positivity is not None and not frame.brightfield:
            raise UsageError("--positivity dab needs a brightfield IHC slide (hematoxylin + DAB); "
                             "this slide is fluorescence")
        self.frame = frame
        self.d = float(frame.downsample)
        self.E = o.expansion_um / float(frame.um_per_px) if o.cells else 0.0  # working px
        self.E2 = self.E * self.E
        self.R = int(math.floor(self.E + 1e-9)) if o.cells else 0
        self.r = TISSUE_RADIUS if frame.brightfield else 0
        self.reach = (2 * self.R + self.r + 1) if o.cells else 0
        try:
            for s in self.sinks:
                s.open(frame)
                self._opened.append(s)
        except BaseException:
            self.abort()
            raise

    def add_tile(self, view: Any) -> None:
        if self.options.active:
            self.tiles[int(view.index)] = _Tile(view)
        for s in self.sinks:
            s.add_tile(view)

    def add(self, nucleus: Any) -> None:
        self.queue.append(nucleus)

    def flush(self, y_final: float) -> None:
        self._process(y_final)
        held = min((n.y0 for n in self.queue), default=math.inf)
        for s in self.sinks:
            s.flush(min(y_final, held))

    def close(self) -> None:
        self._process(math.inf)
        for s in self.sinks:
            s.close()

    def abort(self) -> None:
        for s in self._opened:
            try:
                s.abort()
            except Exception:  # noqa: BLE001 - keep the original error
                log.debug("abort of %r failed", s, exc_info=True)

    # ----------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        out = self.options.describe()
        if self.options.cells:
            out["cells"] = self.cells
            if self.nuclei_outside_cell:
                out["nuclei_outside_their_cell"] = self.nuclei_outside_cell
        if self.options.positivity is not None:
            out.update(self.options.positivity.summary(self.counts))
        return out

    # ----------------------------------------------------------------- work
    def _process(self, y_final: float) -> None:
        ready = []
        while self.queue and self.queue[0].y1 + self.reach <= y_final:
            ready.append(self.queue.popleft())
        if ready:
            pos = self.options.positivity
            if pos is not None:
                for n in ready:
                    self._measure_dab(n)
            if self.options.cells:
                self._grow_cells(ready)
                self.recent.extend(ready)
            for n in ready:
                if pos is not None:
                    n.classification = pos.classify(n.measurements.get("dab_mean", float("nan")))
                    self.counts[n.classification] += 1
                for s in self.sinks:
                    s.add(n)
        self._prune(y_final)

    def _prune(self, y_final: float) -> None:
        lowest = min(y_final, min((n.y0 for n in self.queue), default=math.inf))
        if self.recent:
            self.recent = [n for n in self.recent if n.y1 + 2 * self.R + 1 > lowest]
        margin = self.R + self.r + 1
        for i in [i for i, t in self.tiles.items() if t.bottom <= lowest - margin]:
            del self.tiles[i]

    def _measure_dab(self, n: Any) -> None:
        t = self.tiles.get(int(n.tile))
        if t is None:  # cannot happen with stitch_store's order; never fail an export over it
            n.measurements["dab_mean"] = n.measurements["dab_std"] = float("nan")
            return
        h, w = n.mask.shape
        vals = t.dab()[n.y0 - t.oy:n.y0 - t.oy + h, n.x0 - t.ox:n.x0 - t.ox + w][n.mask].astype(np.float64)
        n.measurements["dab_mean"] = float(vals.mean()) if vals.size else float("nan")
        n.measurements["dab_std"] = float(vals.std()) if vals.size else float("nan")

    def _mosaic(self, X0: int, Y0: int, X1: int, Y1: int) -> tuple[np.ndarray, np.ndarray]:
        """Working pixels of [X0, X1) x [Y0, Y1), each from the tile whose core owns it; and where there are any."""
        img = np.zeros((Y1 - Y0, X1 - X0, 3), np.uint8)
        have = np.zeros((Y1 - Y0, X1 - X0), bool)
        for t in self.tiles.values():
            cx0, cy0, cx1, cy1 = t.core
            ix0, iy0, ix1, iy1 = max(X0, cx0), max(Y0, cy0), min(X1, cx1), min(Y1, cy1)
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            img[iy0 - Y0:iy1 - Y0, ix0 - X0:ix1 - X0] = t.pixels[iy0 - t.oy:iy1 - t.oy, ix0 - t.ox:ix1 - t.ox, :3]
            have[iy0 - Y0:iy1 - Y0, ix0 - X0:ix1 - X0] = True
        return img, have

    def _grow_cells(self, ready: list[Any]) -> None:
        competitors = self.recent + ready + list(self.queue)
        competitors.sort(key=_tie_key)
        rank = {id(n): k for k, n in enumerate(competitors)}
        R = self.R
        boxes = np.array([(n.x0 - R, n.y0 - R, n.x0 + n.mask.shape[1] + R, n.y0 + n.mask.shape[0] + R)
                          for n in competitors], np.int64).reshape(-1, 4)
        for chunk in _chunks(sorted(ready, key=lambda n: (n.x0, n.order)), R):
            self._grow_chunk(chunk, competitors, boxes, rank)

    def _grow_chunk(self, chunk: list[Any], competitors: list[Any], boxes: np.ndarray, rank: dict[int, int]) -> None:
        from scipy import ndimage as ndi

        from nucli.postprocess import BRIGHTFIELD, fluorescence_intensity, hematoxylin, tissue_pixels

        W, H = self.frame.working_size
        R, r, d = self.R, self.r, self.d
        wx0 = max(min(n.x0 for n in chunk) - R, 0)
        wy0 = max(min(n.y0 for n in chunk) - R, 0)
        wx1 = min(max(n.x0 + n.mask.shape[1] for n in chunk) + R, W)
        wy1 = min(max(n.y0 + n.mask.shape[0] for n in chunk) + R, H)
        mx0, my0, mx1, my1 = max(wx0 - r, 0), max(wy0 - r, 0), min(wx1 + r, W), min(wy1 + r, H)
        img, have = self._mosaic(mx0, my0, mx1, my1)
        if self.frame.brightfield:
            t = (tissue_pixels(img, BRIGHTFIELD) & have).astype(np.int32)
            votes = ndi.correlate(t, np.ones((2 * r + 1, 2 * r + 1), np.int32), mode="constant", cval=0)
            tissue = (votes * 2 > (2 * r + 1) ** 2) & have
        else:
            tissue = have
        sl = (slice(wy0 - my0, wy1 - my0), slice(wx0 - mx0, wx1 - mx0))
        tissue = tissue[sl]
        img = img[sl]
        channel = hematoxylin(img) if self.frame.brightfield else fluorescence_intensity(img)
        dab = None
        if self.options.positivity is not None:
            from nucli.export.positivity import dab_od

            dab = dab_od(img)

        hh, ww = wy1 - wy0, wx1 - wx0
        big = np.iinfo(np.int64).max
        best = np.full((hh, ww), big, np.int64)
        owner = np.full((hh, ww), -1, np.int64)
        inside = (boxes[:, 0] < wx1) & (boxes[:, 2] > wx0) & (boxes[:, 1] < wy1) & (boxes[:, 3] > wy0)
        for k in np.flatnonzero(inside):  # ascending rank: a tie keeps the earlier nucleus
            n = competitors[k]
            pad = np.pad(np.asarray(n.mask, bool), R)
            if R > 0:
                _, (iy, ix) = ndi.distance_transform_edt(~pad, return_indices=True)
                yy, xx = np.indices(pad.shape)
                d2 = (iy - yy).astype(np.int64) ** 2 + (ix - xx).astype(np.int64) ** 2
            else:
                d2 = np.where(pad, 0, big)
            bx0, by0 = n.x0 - R, n.y0 - R
            gx0, gy0 = max(bx0, wx0), max(by0, wy0)
            gx1, gy1 = min(bx0 + pad.shape[1], wx1), min(by0 + pad.shape[0], wy1)
            if gx1 <= gx0 or gy1 <= gy0:
                continue
            sub = d2[gy0 - by0:gy1 - by0, gx0 - bx0:gx1 - bx0]
            ws = (slice(gy0 - wy0, gy1 - wy0), slice(gx0 - wx0, gx1 - wx0))
            valid = (sub == 0) | ((sub <= self.E2) & tissue[ws])
            cur = best[ws]
            upd = valid & (sub < cur)
            cur[upd] = sub[upd]
            owner[ws][upd] = rank[id(n)]

        for n in chunk:
            h, w = n.mask.shape
            near = np.flatnonzero((boxes[:, 0] < n.x0 + w + 2 * R) & (boxes[:, 2] > n.x0 - 2 * R)
                                  & (boxes[:, 1] < n.y0 + h + 2 * R) & (boxes[:, 3] > n.y0 - 2 * R))
            neighbours = [competitors[j] for j in near if competitors[j] is not n]
            self._make_cell(n, rank[id(n)], owner, (wx0, wy0, wx1, wy1), channel, dab, neighbours)

    @staticmethod
    def _fit_nuclei(n: Any, cell: Any, neighbours: list[Any]) -> Any:
        """The pixel-edge cell adjusted to the nucleus outlines, which run through pixel centres: a nucleus
        outline cuts the corner of an outside pixel at each concave corner (1/8 px²). The cell takes its own
        nucleus' corners and gives up its neighbours' ones, so each nucleus lies inside its cell and cells
        still never overlap (every vertex involved is on the 0.01 px grid already)."""
        import shapely

        from nucli.export.qupath_grid import GRID, snap

        if not cell.covers(n.polygon):
            cell = shapely.union(cell, n.polygon, grid_size=GRID)
        if neighbours:
            others = np.array([m.polygon for m in neighbours], dtype=object)
            hit = shapely.intersects(cell, others) & ~shapely.touches(cell, others)
            if hit.any():
                cell = shapely.difference(cell, shapely.union_all(others[hit], grid_size=GRID), grid_size=GRID)
        if cell.geom_type != "Polygon":
            parts = [g for g in getattr(cell, "geoms", []) if g.geom_type == "Polygon" and g.area > 0]
            if not parts:
                return None
            cell = max(parts, key=lambda g: g.intersection(n.polygon).area)
        return snap(cell)

    def _make_cell(self, n: Any, k: int, owner: np.ndarray, window: tuple[int, int, int, int], channel: np.ndarray,
                   dab: np.ndarray | None, neighbours: list[Any]) -> None:
        import shapely
        from scipy import ndimage as ndi

        from nucli.export.qupath_grid import GRID, snap

        wx0, wy0, wx1, wy1 = window
        R, d = self.R, self.d
        h, w = n.mask.shape
        bx0, by0 = max(n.x0 - R, wx0), max(n.y0 - R, wy0)
        bx1, by1 = min(n.x0 + w + R, wx1), min(n.y0 + h + R, wy1)
        region = owner[by0 - wy0:by1 - wy0, bx0 - wx0:bx1 - wx0] == k
        nuc = np.zeros_like(region)
        nuc[n.y0 - by0:n.y0 - by0 + h, n.x0 - bx0:n.x0 - bx0 + w] = n.mask
        parts, count = ndi.label(region)
        if count == 0 or not (nuc & region).any():
            return  # every pixel of this nucleus went to an earlier, overlapping one: it stays a detection
        if count > 1:
            keep = int(np.bincount(parts[nuc & region], minlength=count + 1)[1:].argmax()) + 1
            region = parts == keep
        poly = pixel_outline(region, bx0, by0)
        cell = snap(shapely.transform(poly, lambda c: c * d) if d != 1.0 else poly)
        if cell is None:
            return
        cell = self._fit_nuclei(n, cell, neighbours)
        if cell is None:
            return
        if not cell.covers(n.polygon) and not cell.buffer(GRID, join_style="mitre").covers(n.polygon):
            # (slivers thinner than the 0.01 px grid, where a rounded vertex cuts a nucleus edge, do not count)
            self.nuclei_outside_cell += 1
        n.cell = cell
        self.cells += 1
        m = n.measurements
        area, length = cell.area, cell.length
        m["cell_area_px2"] = area
        m["cell_perimeter_px"] = length
        m["cell_circularity"] = _circularity(cell)
        hull = cell.convex_hull.area
        m["cell_solidity"] = min(1.0, area / hull) if hull > 0 else 1.0
        m["nucleus_cell_area_ratio"] = min(max(n.polygon.area / area, 0.0), 1.0) if area > 0 else float("nan")
        u = self.frame.um_per_px
        if u:
            s = float(u) / d  # µm per level-0 px
            m["cell_area_um2"] = area * s * s
            m["cell_perimeter_um"] = length * s
        ws = (slice(by0 - wy0, by1 - wy0), slice(bx0 - wx0, bx1 - wx0))
        cyto = region & ~nuc

        def mean(arr: np.ndarray, sel: np.ndarray) -> float:
            v = arr[ws][sel]
            return float(v.astype(np.float64).mean()) if v.size else float("nan")

        m["cell_channel_mean"] = mean(channel, region)
        m["cytoplasm_channel_mean"] = mean(channel, cyto)
        if dab is not None:
            m["cell_dab_mean"] = mean(dab, region)
            m["cytoplasm_dab_mean"] = mean(dab, cyto)


def _tie_key(n: Any) -> tuple[float, float, float]:
    """Which nucleus takes a pixel two nuclei are equally near: the one whose centre is higher up, then further
    left (the centre of its pixels: the same however the slide was tiled, unlike the output order)."""
    m = n.measurements
    return (m.get("centroid_y_px", 0.0), m.get("centroid_x_px", 0.0), m.get("area_px2", 0.0))


def _chunks(nuclei: list[Any], R: int) -> list[list[Any]]:
    """Nuclei (sorted by x) in groups whose grown boxes span at most about ``CHUNK`` px."""
    out: list[list[Any]] = []
    cur: list[Any] = []
    x_lo = 0
    for n in nuclei:
        if cur and n.x0 + n.mask.shape[1] + R - x_lo > CHUNK:
            out.append(cur)
            cur = []
        if not cur:
            x_lo = n.x0 - R
        cur.append(n)
    if cur:
        out.append(cur)
    return out


__all__ = ["ObjectOptions", "ObjectStage", "object_options", "check_store", "pixel_outline", "DEFAULT_EXPANSION_UM",
           "CELL_CLASS", "NUCLEUS_CLASS"]
