"""Synthetic slides for tests and demos, written tile by tile.

Two pieces:

* :class:`SyntheticTissue` -- an analytic "slide": a mostly white background
  with a few elliptical tissue islands, filled with dark elliptical nuclei.
  Nothing is stored per nucleus: the plane is cut into square cells and a hash
  of each cell's index decides whether it holds a nucleus and its shape, so any
  region can be rendered at any downsample without holding the slide in memory,
  and the nuclei of any region can be listed (ground truth for tests).
* :func:`write_pyramidal_tiff` -- streams any ``render(x, y, w, h, downsample)``
  callable into a tiled, multi-level TIFF (Aperio-style SVS layout by default,
  readable by OpenSlide, tiffslide and tifffile; pixel size recorded both in the
  Aperio ``MPP`` field and in the TIFF resolution tags). Tiles are produced one at
  a time, so a 40,000 x 40,000 px slide needs a few MB of memory.

:func:`write_synthetic_slide` ties them together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

Render = Callable[[int, int, int, int, float], np.ndarray]
"""``render(x, y, w, h, downsample) -> (h, w, 3) uint8``: the region whose top-left
pixel is ``(x, y)`` in the pixel grid of that downsample (level-0 px = px * downsample)."""

BACKGROUND = (244, 244, 242)
TISSUE = (226, 164, 196)
NUCLEUS = (88, 52, 128)

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class Island:
    """An elliptical tissue island, level-0 px."""

    cx: float
    cy: float
    rx: float
    ry: float

    def bbox(self) -> tuple[float, float, float, float]:
        return self.cx - self.rx, self.cy - self.ry, self.cx + self.rx, self.cy + self.ry

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ((x - self.cx) / self.rx) ** 2 + ((y - self.cy) / self.ry) ** 2 <= 1.0


def _mix(a: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        a = (a ^ (a >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        a = (a ^ (a >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        a = a ^ (a >> np.uint64(31))
    return a


def _uniforms(ix: np.ndarray, iy: np.ndarray, seed: int, k: int) -> list[np.ndarray]:
    """``k`` deterministic uniforms in [0, 1) per cell index pair."""
    with np.errstate(over="ignore"):
        base = (ix.astype(np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            iy.astype(np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        )
        base = base ^ (np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x165667B19E3779F9))
        out = []
        for j in range(k):
            h = _mix(base + np.uint64(j + 1) * np.uint64(0x9E3779B97F4A7C15))
            out.append((h >> np.uint64(11)).astype(np.float64) / float(1 << 53))
    return out


@dataclass(frozen=True)
class SyntheticTissue:
    """Mostly background with tissue islands full of dark elliptical nuclei.

    Nuclei live in square cells of ``cell`` level-0 px; a cell whose centre lies in
    an island holds a nucleus with probability ``density``. Each nucleus is an
    ellipse with semi-axes in ``radius`` (level-0 px), rotated, and fully inside
    its cell, so nuclei never touch.
    """

    width: int
    height: int
    islands: tuple[Island, ...]
    seed: int = 0
    cell: int = 24
    density: float = 0.6
    radius: tuple[float, float] = (4.0, 9.0)
    background: tuple[int, int, int] = BACKGROUND
    tissue: tuple[int, int, int] = TISSUE
    nucleus: tuple[int, int, int] = NUCLEUS
    texture: bool = True

    # ------------------------------------------------------------------ geometry
    def in_tissue(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
        for isl in self.islands:
            inside |= isl.contains(x, y)
        return inside

    def _cell_params(self, ix: np.ndarray, iy: np.ndarray):
        c = float(self.cell)
        u = _uniforms(ix, iy, self.seed, 6)
        ccx, ccy = (ix + 0.5) * c, (iy + 0.5) * c
        present = (u[0] < self.density) & self.in_tissue(ccx, ccy)
        r_lo, r_hi = self.radius
        r_hi = min(r_hi, c / 2.0 - 1.0)
        a = r_lo + (r_hi - r_lo) * u[1]
        b = np.maximum(r_lo * 0.6, a * (0.55 + 0.45 * u[2]))
        theta = np.pi * u[3]
        slack = c / 2.0 - a - 0.5
        cx = ccx + (2 * u[4] - 1) * np.maximum(slack, 0)
        cy = ccy + (2 * u[5] - 1) * np.maximum(slack, 0)
        return present, cx, cy, a, b, theta

    def nuclei(self, x: float = 0, y: float = 0, w: float | None = None, h: float | None = None) -> np.ndarray:
        """Nuclei whose centre lies in the level-0 region: rows ``(cx, cy, a, b, theta)``."""
        w = self.width - x if w is None else w
        h = self.height - y if h is None else h
        c = self.cell
        ix = np.arange(math.floor(x / c), math.ceil((x + w) / c))
        iy = np.arange(math.floor(y / c), math.ceil((y + h) / c))
        gx, gy = np.meshgrid(ix, iy)
        present, cx, cy, a, b, th = self._cell_params(gx.ravel(), gy.ravel())
        keep = present & (cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h)
        return np.stack([cx[keep], cy[keep], a[keep], b[keep], th[keep]], axis=1)

    def nucleus_fraction(self) -> float:
        """Expected fraction of tissue area covered by nuclei."""
        r_lo, r_hi = self.radius
        r_hi = min(r_hi, self.cell / 2.0 - 1.0)
        mean_a = (r_lo + r_hi) / 2
        return float(self.density * math.pi * mean_a * mean_a * 0.775 / self.cell**2)

    # ------------------------------------------------------------------ rendering
    def render(self, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the region at ``downsample`` (see :data:`Render`)."""
        d = float(downsample)
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[:] = self.background
        x0, y0, x1, y1 = x * d, y * d, (x + w) * d, (y + h) * d
        hit = [
            isl for isl in self.islands
            if not (isl.bbox()[2] < x0 or isl.bbox()[0] > x1 or isl.bbox()[3] < y0 or isl.bbox()[1] > y1)
        ]
        if not hit:
            return out
        X = (x + np.arange(w) + 0.5) * d
        Y = (y + np.arange(h) + 0.5) * d
        XX, YY = np.meshgrid(X, Y)
        tissue = np.zeros((h, w), dtype=bool)
        for isl in hit:
            tissue |= isl.contains(XX, YY)
        if not tissue.any():
            return out
        tcol = np.asarray(self.tissue, dtype=np.float32)
        ncol = np.asarray(self.nucleus, dtype=np.float32)
        if d * 2.5 > self.radius[0]:
            # nuclei smaller than ~2 px at this downsample: blend their mean colour
            f = self.nucleus_fraction()
            out[tissue] = np.round(tcol * (1 - f) + ncol * f).astype(np.uint8)
            return out
        img = np.empty((h, w, 3), dtype=np.float32)
        img[:] = tcol
        if self.texture:
            (t,) = _uniforms(np.floor(XX / 6).astype(np.int64), np.floor(YY / 6).astype(np.int64), self.seed + 7, 1)
            img *= (0.94 + 0.08 * t)[..., None].astype(np.float32)
        c = float(self.cell)
        ix = np.floor(XX / c).astype(np.int64)
        iy = np.floor(YY / c).astype(np.int64)
        present, cx, cy, a, b, th = self._cell_params(ix, iy)
        dx, dy = XX - cx, YY - cy
        ct, st = np.cos(th), np.sin(th)
        u = (dx * ct + dy * st) / a
        v = (-dx * st + dy * ct) / b
        nuc = present & (u * u + v * v <= 1.0) & tissue
        img[nuc] = ncol
        region = img[tissue]
        out[tissue] = np.clip(np.round(region), 0, 255).astype(np.uint8)
        return out


def make_tissue(
    width: int,
    height: int,
    n_islands: int = 3,
    *,
    island_radius: tuple[float, float] | None = None,
    seed: int = 0,
    **kwargs,
) -> SyntheticTissue:
    """Place ``n_islands`` non-overlapping elliptical islands at random (seeded).

    ``island_radius`` is the (min, max) semi-axis in level-0 px (default: 4-9 % of
    the shorter side). Extra keyword arguments go to :class:`SyntheticTissue`.
    """
    rng = np.random.default_rng(seed)
    short = min(width, height)
    lo, hi = island_radius or (0.04 * short, 0.09 * short)
    islands: list[Island] = []
    tries = 0
    while len(islands) < n_islands:
        tries += 1
        if tries > 10_000:
            raise ValueError(f"cannot place {n_islands} islands of radius {lo:.0f}-{hi:.0f} px in {width}x{height}")
        rx, ry = rng.uniform(lo, hi, size=2)
        cx = rng.uniform(rx + 1, width - rx - 1)
        cy = rng.uniform(ry + 1, height - ry - 1)
        cand = Island(float(cx), float(cy), float(rx), float(ry))
        gap = 0.02 * short
        if all(
            abs(cand.cx - o.cx) > cand.rx + o.rx + gap or abs(cand.cy - o.cy) > cand.ry + o.ry + gap
            for o in islands
        ):
            islands.append(cand)
    return SyntheticTissue(width, height, tuple(islands), seed=seed, **kwargs)


# ---------------------------------------------------------------------- TIFF writing
def _level_sizes(width: int, height: int, tile: int, factor: int, levels: int | None) -> list[tuple[int, int, int]]:
    """(downsample, w, h) per level: downsample factor**k until the level fits one tile."""
    out = [(1, width, height)]
    d = 1
    while True:
        if levels is not None and len(out) >= levels:
            break
        d *= factor
        w, h = width // d, height // d
        if w < 1 or h < 1:
            break
        if levels is None and max(out[-1][1], out[-1][2]) <= tile:
            break
        out.append((d, w, h))
    return out


def _tiles(render: Render, w: int, h: int, tile: int, downsample: float) -> Iterator[np.ndarray]:
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            tw, th = min(tile, w - tx), min(tile, h - ty)
            block = np.asarray(render(tx, ty, tw, th, downsample), dtype=np.uint8)
            if block.shape != (th, tw, 3):
                raise ValueError(f"render returned {block.shape}, expected {(th, tw, 3)}")
            if (tw, th) != (tile, tile):
                full = np.zeros((tile, tile, 3), dtype=np.uint8)
                full[:th, :tw] = block
                block = full
            yield block


def write_pyramidal_tiff(
    path: str | Path,
    render: Render,
    width: int,
    height: int,
    *,
    mpp: float | None = 0.5,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    levels: int | None = None,
    level_factor: int = 4,
    thumbnail: int | None = 512,
    associated: dict[str, np.ndarray] | None = None,
    flavor: str = "svs",
    magnification: float | None = 20.0,
) -> Path:
    """Stream ``render`` into a tiled pyramidal TIFF at ``path``.

    ``compression`` is ``'jpeg'`` (lossy, small) or ``'zlib'``/``'none'`` (lossless).
    ``flavor='svs'`` writes the Aperio layout (level 0, a stripped thumbnail, the
    reduced levels, then associated images such as ``{'label': arr}``), with
    ``MPP = mpp`` in the description; ``flavor='tiff'`` writes a generic tiled TIFF
    (reduced levels as further pages, as OpenSlide's generic-tiff reader expects)
    with the pixel size in the resolution tags only. ``mpp=None`` writes no pixel size at all.
    """
    import tifffile

    path = Path(path)
    if flavor not in ("svs", "tiff"):
        raise ValueError("flavor must be 'svs' or 'tiff'")
    comp = {"none": None, "zlib": "zlib", "deflate": "zlib", "jpeg": "jpeg"}[compression]
    comp_args = {"level": quality} if comp == "jpeg" else None
    sizes = _level_sizes(width, height, tile, level_factor, levels)
    bigtiff = width * height * 3 * 1.4 > 2**31
    res = {}
    if mpp:
        res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    common = dict(photometric="rgb", compression=comp, compressionargs=comp_args, metadata=None)
    tmp = path.with_name(path.name + ".part")
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        if flavor == "svs":
            head = "Aperio Image Library nucli-synthetic\r\n"
            fields = [f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) {compression.upper()} Q={quality}"]
            if magnification:
                fields.append(f"AppMag = {magnification:g}")
            if mpp:
                fields.append(f"MPP = {mpp:.6g}")
            tw.write(
                _tiles(render, width, height, tile, 1.0), shape=(height, width, 3), dtype="uint8",
                tile=(tile, tile), description=head + "|".join(fields), **res, **common,
            )
            if thumbnail:
                d = max(width, height) / thumbnail
                tw_, th_ = max(1, round(width / d)), max(1, round(height / d))
                thumb = render(0, 0, tw_, th_, max(width / tw_, height / th_))
                tw.write(thumb, description=f"{head}{width}x{height} -> {tw_}x{th_}",
                         rowsperstrip=16, **common)
            for d, w, h in sizes[1:]:
                tw.write(
                    _tiles(render, w, h, tile, float(d)), shape=(h, w, 3), dtype="uint8", tile=(tile, tile),
                    description=f"{head}{width}x{height} -> {w}x{h} - ({tile}x{tile}) {compression.upper()}",
                    **common,
                )
            for name, arr in (associated or {}).items():
                arr = np.ascontiguousarray(arr, dtype=np.uint8)
                tw.write(arr, description=f"{head}{name} {arr.shape[1]}x{arr.shape[0]}", subfiletype=1,
                         photometric="rgb", compression="zlib", metadata=None, rowsperstrip=16)
        else:
            tw.write(
                _tiles(render, width, height, tile, 1.0), shape=(height, width, 3), dtype="uint8",
                tile=(tile, tile), **res, **common,
            )
            for d, w, h in sizes[1:]:
                tw.write(_tiles(render, w, h, tile, float(d)), shape=(h, w, 3), dtype="uint8",
                         tile=(tile, tile), subfiletype=1, **common)
    tmp.replace(path)
    return path


def write_synthetic_slide(
    path: str | Path,
    width: int = 20_000,
    height: int = 20_000,
    *,
    n_islands: int = 3,
    seed: int = 0,
    mpp: float | None = 0.5,
    tissue_kwargs: dict | None = None,
    **write_kwargs,
) -> SyntheticTissue:
    """Make a mostly-background slide with ``n_islands`` islands of nuclei at ``path``.

    Returns the :class:`SyntheticTissue` (islands and nuclei: the ground truth).
    """
    tissue = make_tissue(width, height, n_islands, seed=seed, **(tissue_kwargs or {}))
    write_pyramidal_tiff(path, tissue.render, width, height, mpp=mpp, **write_kwargs)
    return tissue


def write_plain_image(path: str | Path, image: np.ndarray, **tiff_kwargs) -> Path:
    """Write a plain (non-pyramidal) image: TIFF via tifffile, PNG/JPEG via scikit-image."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, image, **tiff_kwargs)
    else:
        import skimage.io

        skimage.io.imsave(path, image, check_contrast=False)
    return path


def ellipse_image(
    shape: Sequence[int], centers: Sequence[tuple[float, float]], radius: float = 8.0,
    fg: Sequence[int] = NUCLEUS, bg: Sequence[int] = TISSUE,
) -> np.ndarray:
    """Small helper: an RGB image with filled discs at ``centers`` ((x, y) pairs)."""
    h, w = int(shape[0]), int(shape[1])
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = bg
    for cx, cy in centers:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = fg
    return img


__all__ = [
    "Island", "SyntheticTissue", "make_tissue", "write_pyramidal_tiff", "write_synthetic_slide",
    "write_plain_image", "ellipse_image", "BACKGROUND", "TISSUE", "NUCLEUS",
]
