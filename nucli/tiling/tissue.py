"""Tissue detection on a low-resolution view of the slide, and the tiles it keeps.

:func:`tissue_mask` works on an overview of at most ~``max_size`` px per side
(a pyramid level when one fits, else a resampled read):

* bright-field (light background): tissue score = max(HSV saturation, darkness),
  darkness = 1 - mean(RGB) / glass, where glass is the 99th percentile of mean(RGB)
  (so a grey-ish scan background still scores ~0). Stained tissue is coloured or
  darker than the glass.
* dark-field / fluorescence (dark background, see ``Slide.dark_background``):
  score = brightest channel / 255.

The score is smoothed (Gaussian, 1 px), thresholded with Otsu's method clamped
to ``[0.05, 0.12]`` (the clamp keeps an all-background image empty and keeps
pale tissue in an image that is all tissue), objects smaller than
``min_area_um2`` are removed, and the mask is grown by ``dilate_um`` so tiles at
the edge of tissue are kept. When the pixel size is unknown, 0.5 µm/px is assumed
for these areas.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np

from nucli.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from nucli.slide import Slide
    from nucli.tiling.grid import TileGrid

log = logging.getLogger("nucli.tissue")

THRESHOLD_RANGE = (0.05, 0.12)
ASSUMED_MPP = 0.5


class NoTissueError(InputError):
    """The tissue mask is empty: nothing to process."""


def mask_downsample_for(slide: "Slide", max_size: int = 1024) -> float:
    """Level-0 px per mask px: a pyramid level when one is at most 2x finer than
    needed for ``max_size``, else exactly ``longest side / max_size``."""
    w0, h0 = slide.dimensions
    target = max(1.0, max(w0, h0) / float(max_size))
    level = slide.best_level(target)
    d = slide.level_downsamples[level]
    return float(d) if d >= target / 2.0 else target


def tissue_score(rgb: np.ndarray, dark_background: bool) -> np.ndarray:
    """Per-pixel tissue score in [0, 1] (see module docstring)."""
    img = rgb.astype(np.float32) / 255.0
    if dark_background:
        return img.max(axis=2)
    mx = img.max(axis=2)
    mn = img.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    mean = img.mean(axis=2)
    glass = max(float(np.percentile(mean, 99.0)), 1.0 / 255.0)
    dark = np.clip(1.0 - mean / glass, 0.0, 1.0)
    return np.maximum(sat, dark)


def mask_from_score(
    score: np.ndarray,
    *,
    px_um: float,
    min_area_um2: float,
    dilate_um: float,
    threshold: float | None = None,
) -> np.ndarray:
    """Score image -> cleaned boolean tissue mask (pure; see module docstring)."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(score.astype(np.float32), 1.0, mode="nearest")
    if threshold is None:
        threshold = _otsu(smooth)
        threshold = float(np.clip(threshold, *THRESHOLD_RANGE))
    mask = smooth > threshold
    if not mask.any():
        return mask
    min_px = min_area_um2 / (px_um * px_um)
    if min_px > 1:
        labels, n = ndimage.label(mask)
        if n:
            sizes = np.bincount(labels.ravel())
            keep = sizes >= min_px
            keep[0] = False
            mask = keep[labels]
    radius = dilate_um / px_um
    if mask.any() and radius >= 0.5:
        mask = ndimage.distance_transform_edt(~mask) <= radius  # grow by a disk of that radius
    return mask


def _otsu(values: np.ndarray) -> float:
    v = values.ravel()
    if v.size == 0 or float(v.max()) - float(v.min()) < 1e-6:
        return float(v.max()) if v.size else 0.0
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(v, nbins=256))


def tissue_mask(
    slide: "Slide",
    *,
    max_size: int = 1024,
    min_area_um2: float | None = None,
    dilate_um: float = 25.0,
    threshold: float | None = None,
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of the whole slide and its downsample (level-0 px per mask px).

    ``min_area_um2`` defaults to 100 µm² for bright-field and 30 µm² for dark-field
    images: about one nucleus, so isolated cells (cytology, fluorescence) are kept
    while sub-cellular specks are dropped. The mask covers
    ``ceil(W0 / d) x ceil(H0 / d)`` px; mask pixel ``(i, j)`` is level-0 region
    ``[j*d, (j+1)*d) x [i*d, (i+1)*d)``.
    """
    d = mask_downsample_for(slide, max_size)
    w0, h0 = slide.dimensions
    w, h = max(1, math.ceil(w0 / d - 1e-6)), max(1, math.ceil(h0 / d - 1e-6))
    dark = slide.dark_background
    rgb = slide.read_scaled(0, 0, w, h, d)
    score = tissue_score(rgb, dark)
    mpp = slide.mpp or ASSUMED_MPP
    if min_area_um2 is None:
        min_area_um2 = 30.0 if dark else 100.0
    mask = mask_from_score(score, px_um=mpp * d, min_area_um2=min_area_um2, dilate_um=dilate_um,
                           threshold=threshold)
    log.info("tissue mask %dx%d at downsample %.3g (%s): %.1f %% tissue", w, h, d,
             "dark-field" if dark else "bright-field", 100.0 * mask.mean())
    return mask, d


def tile_footprint_in_mask(
    grid: "TileGrid", row: int, col: int, downsample: float, mask_shape: tuple[int, int], mask_downsample: float
) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) mask px covered by the in-image part of a tile (half-open)."""
    x, y = grid.origin(row, col)
    w, h = grid.extent(row, col)
    s = downsample / mask_downsample
    x0 = int(math.floor(x * s))
    y0 = int(math.floor(y * s))
    x1 = max(x0 + 1, int(math.ceil((x + w) * s)))
    y1 = max(y0 + 1, int(math.ceil((y + h) * s)))
    mh, mw = mask_shape
    return min(x0, mw), min(y0, mh), min(x1, mw), min(y1, mh)


def tiles_with_tissue(
    grid: "TileGrid", mask: np.ndarray, mask_downsample: float, downsample: float = 1.0
) -> list[tuple[int, int]]:
    """(row, col) of every grid tile whose footprint touches the mask, row-major.

    ``downsample`` is level-0 px per working px (the grid is in working px).
    """
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    out = []
    for row, col in grid.all_tiles():
        x0, y0, x1, y1 = tile_footprint_in_mask(grid, row, col, downsample, mask.shape, mask_downsample)
        if x1 <= x0 or y1 <= y0:
            continue
        if sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0] > 0:
            out.append((row, col))
    return out


__all__ = [
    "NoTissueError", "tissue_mask", "tissue_score", "mask_from_score", "mask_downsample_for",
    "tiles_with_tissue", "tile_footprint_in_mask", "THRESHOLD_RANGE",
]
