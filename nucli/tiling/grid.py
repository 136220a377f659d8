"""Pure tile geometry: where tiles are, what each tile owns.

All coordinates here are in *working-resolution* pixels (the slide resampled to
the working pixel size), origin at the slide's top-left.

Layout along one axis of length ``L`` with tile size ``T`` and overlap ``O``
(stride ``S = T - O``): tiles start at ``0, S, 2S, ...``; the last tile is moved
back to end exactly at ``L`` so that every tile lies inside the image (an image
smaller than one tile gets a single tile, padded). Neighbouring tiles therefore
overlap by at least ``O`` pixels.

Ownership ("core"): the boundary between two neighbouring tiles is the middle of
their overlap. A nucleus belongs to the tile whose core contains its centroid.
A nucleus touching an *interior* edge of a tile (an edge with a neighbour) is
cut there and is never taken from that tile; if its centroid is in the core it
is larger than the overlap allows, which is an error (raise ``--overlap``).
With nuclei no wider than ``O``, each nucleus is whole in the tile that owns it.
Padding beyond the image (an image smaller than a tile) is owned by no tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from nucli.errors import UsageError


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles along one axis (see module docstring)."""
    if tile <= 0:
        raise UsageError(f"tile size must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise UsageError(f"overlap must be in [0, tile size), got {overlap} for tile size {tile}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    last = length - tile
    if not starts or starts[-1] != last:
        starts.append(last)
    return starts


def core_bounds(starts: list[int], tile: int, length: int) -> list[tuple[float, float]]:
    """Half-open ``[lo, hi)`` core interval of every tile along one axis."""
    bounds = []
    n = len(starts)
    for k, s in enumerate(starts):
        lo = 0.0 if k == 0 else (s + starts[k - 1] + tile) / 2.0
        hi = float(length) if k == n - 1 else (starts[k + 1] + s + tile) / 2.0
        bounds.append((lo, hi))
    return bounds


@dataclass(frozen=True)
class TileGrid:
    """The grid of tiles over a ``width`` x ``height`` working-resolution image."""

    width: int
    height: int
    tile_size: int
    overlap: int

    @cached_property
    def xs(self) -> list[int]:
        return axis_starts(self.width, self.tile_size, self.overlap)

    @cached_property
    def ys(self) -> list[int]:
        return axis_starts(self.height, self.tile_size, self.overlap)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        return len(self.ys), len(self.xs)

    def __len__(self) -> int:
        return len(self.xs) * len(self.ys)

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """(x, y) of the tile's top-left corner."""
        return self.xs[col], self.ys[row]

    def extent(self, row: int, col: int) -> tuple[int, int]:
        """(w, h) of the tile's part that lies inside the image (< tile_size if padded)."""
        x, y = self.origin(row, col)
        return min(self.tile_size, self.width - x), min(self.tile_size, self.height - y)

    def core(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Owned region ``(x0, y0, x1, y1)``, half-open, in image coordinates."""
        cx = core_bounds(self.xs, self.tile_size, self.width)[col]
        cy = core_bounds(self.ys, self.tile_size, self.height)[row]
        return cx[0], cy[0], cx[1], cy[1]

    def interior_edges(self, row: int, col: int) -> tuple[bool, bool, bool, bool]:
        """Which edges (left, top, right, bottom) have a neighbouring tile."""
        rows, cols = self.shape
        return col > 0, row > 0, col < cols - 1, row < rows - 1

    def all_tiles(self) -> list[tuple[int, int]]:
        """Every (row, col), row-major."""
        return [(r, c) for r in range(len(self.ys)) for c in range(len(self.xs))]

    def owns(self, row: int, col: int, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        """Vectorised: which image-coordinate centroids fall in this tile's core."""
        x0, y0, x1, y1 = self.core(row, col)
        return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)


def spread(n: int, k: int) -> list[int]:
    """Up to ``k`` indices spread evenly over ``range(n)``, first and last included (sorted, distinct)."""
    if n <= 0 or k <= 0:
        return []
    return sorted(set(np.linspace(0, n - 1, min(n, k)).round().astype(int).tolist()))

