"""``watershed``: a classical method with no weights.

Per tile: the nucleus channel (hematoxylin by colour deconvolution for
brightfield, raw intensity for fluorescence; polarity detected per tile by the
rule in :mod:`nucli.postprocess`), lightly smoothed; Otsu's threshold over the
tissue pixels; holes filled and specks removed; touching nuclei split by a
distance-transform watershed seeded at the distance maxima; objects smaller than
``min_area_px`` or wider/taller than ``max_nucleus_diameter_px`` dropped (the
stitcher's size check then only trips on a real misconfiguration).

Settings (``MethodConfig.params``): ``polarity`` ("auto", "dark" for
brightfield, "bright" for fluorescence), ``threshold`` (fixed value in the
nucleus channel instead of Otsu; hematoxylin OD units or 0-255 intensity),
``brightfield_threshold_range`` (Otsu's hematoxylin threshold is clamped into it),
``smooth_sigma`` (px), ``min_area_px``, ``min_distance_px`` (closest two nucleus
centres may be), ``h`` (distance-map peak height, px).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nucli.models.base import Method, MethodConfig, TileResult
from nucli.models.registry import MethodSpec, register

CONFIG = MethodConfig(
    name="watershed",
    mpp=0.5,
    nucleus_diameter_px=16.0,
    max_nucleus_diameter_px=40,
    tile_size=512,
    overlap=64,
    batch_size=8,
    params={
        "polarity": "auto",
        "threshold": None,
        "brightfield_threshold_range": [0.06, 0.10],
        "smooth_sigma": 1.0,
        "min_area_px": 30,
        "min_distance_px": 6,
        "h": 1.0,
    },
)


class WatershedMethod(Method):
    """Otsu + distance-transform watershed on the nucleus channel."""

    def postprocess(self, raw: Any) -> list[TileResult]:
        tiles = np.asarray(raw)
        return [TileResult(labels=self.segment_one(tile)) for tile in tiles]

    def segment_one(self, tile: np.ndarray) -> np.ndarray:
        """One (H, W, 3) uint8 tile -> (H, W) int32 labels."""
        from scipy import ndimage as ndi

        from nucli import postprocess as pp

        p = {**CONFIG.params, **(self.config.params or {})}
        tile = pp.as_rgb(np.asarray(tile))
        shape = tile.shape[:2]
        if tile.size == 0:
            return np.zeros(shape, np.int32)
        polarity = p["polarity"] if p["polarity"] in (pp.BRIGHTFIELD, pp.FLUORESCENCE) else pp.detect_polarity(tile)
        channel = pp.nucleus_channel(tile, polarity)
        sigma = float(p["smooth_sigma"])
        if sigma > 0:
            channel = ndi.gaussian_filter(channel, sigma)
        threshold = p["threshold"]
        if threshold is None:
            threshold = self._auto_threshold(tile, channel, polarity, p)
            if threshold is None:
                return np.zeros(shape, np.int32)
        mask = channel > float(threshold)
        mask = pp.fill_holes(pp.open3(mask))  # = ndi.binary_fill_holes(ndi.binary_opening(mask, 3x3))
        labels = pp.split_touching(mask, min_distance=float(p["min_distance_px"]), h=float(p["h"]))
        return pp.filter_sizes(labels, min_area=float(p["min_area_px"]),
                               max_extent=float(self.config.max_nucleus_diameter_px))

    @staticmethod
    def _auto_threshold(tile: np.ndarray, channel: np.ndarray, polarity: str, p: dict) -> float | None:
        from nucli import postprocess as pp

        if polarity == pp.BRIGHTFIELD:
            tissue = pp.tissue_pixels(tile, polarity)
            if tissue.sum() < 64:
                return None
            t = pp.otsu_threshold(channel[tissue])
            if t is None:
                return None
            # Otsu over tissue swings with the tile's content (stroma only, mostly glass);
            # clamping keeps neighbouring tiles consistent and faint eosin out
            lo, hi = p["brightfield_threshold_range"]
            return float(min(max(t, lo), hi))
        t = pp.otsu_threshold(channel)
        if t is None:
            return None
        # fluorescence: a threshold barely above the background means there is no signal
        return t if t - float(np.median(channel)) > 8.0 else None


def _build(config: MethodConfig, weights: Path | None, device: str) -> Method:
    if weights is not None:
        from nucli.errors import UsageError

        raise UsageError("method 'watershed' has no weights; drop --weights")
    return WatershedMethod(config)


register(
    MethodSpec(
        name="watershed",
        summary="Classical: Otsu on hematoxylin/intensity + distance-transform watershed (no weights).",
        config=CONFIG,
        builder=_build,
    )
)
