"""3-class probabilities -> instance labels: watershed seeded from nucleus bodies.

The U-Net predicts background, nucleus body and a coarse edge band (about 4 px
wide, centred on the true contour). Each connected body component is a seed;
a band pixel belongs to the nuclei when it is nearer to a body than to the
background (so the contour falls on the middle line of the band, shifted by
``band_bias`` px), and a watershed on the edge probability decides which seed
it belongs to where two nuclei meet.

With ``split_h > 0`` a body that the network left merged is split further:
seeds are the regional maxima of the body's distance transform that stand
``split_h`` px above their surroundings (h-maxima), and the watershed then runs
on the negated distance transform of the nucleus mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nucli.postprocess import centroid_radius, h_maxima_by_region


@dataclass(frozen=True)
class PostprocessParams:
    body_threshold: float = 0.5  # P(body) for a seed pixel
    background_threshold: float = 0.5  # P(background) above which a pixel is background
    band_bias: float = 0.0  # px: > 0 moves contours outwards, < 0 inwards
    min_seed_area: int = 3
    min_area: int = 10
    split_h: float = 0.0  # > 0: also split a body at distance-transform maxima deeper than this (px)
    max_diameter: int = 0  # > 0: drop instances reaching farther than max_diameter / 2 - 1 px from their centroid

    @classmethod
    def from_dict(cls, d: dict | None) -> "PostprocessParams":
        d = d or {}
        return cls(**{k: type(getattr(cls, k))(d[k]) for k in cls.__dataclass_fields__ if k in d})


    def scaled(self, s: float) -> "PostprocessParams":
        """The same settings for maps resampled ``s`` times (lengths times ``s``, areas times ``s²``)."""
        if abs(s - 1.0) < 1e-6:
            return self
        return PostprocessParams(
            self.body_threshold, self.background_threshold, self.band_bias * s,
            max(1, round(self.min_seed_area * s * s)), max(1, round(self.min_area * s * s)),
            self.split_h * s, round(self.max_diameter * s) if self.max_diameter > 0 else 0)

def instances_from_probs(prob: np.ndarray, params: PostprocessParams = PostprocessParams()) -> np.ndarray:
    """(3, H, W) probabilities (background, body, edge) -> (H, W) int32 labels 1..n."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    prob = np.asarray(prob, dtype=np.float32)
    bg, body, edge = prob[0], prob[1], prob[2]
    seeds = body >= params.body_threshold
    markers, n = ndi.label(seeds)
    if n == 0:
        return np.zeros(bg.shape, np.int32)
    if params.min_seed_area > 1:
        sizes = np.bincount(markers.ravel())
        small = sizes < params.min_seed_area
        small[0] = False
        if small.any():
            markers[small[markers]] = 0
            seeds = markers > 0
            if not seeds.any():
                return np.zeros(bg.shape, np.int32)
    background = bg >= params.background_threshold
    d_body = ndi.distance_transform_edt(~seeds)
    d_bg = ndi.distance_transform_edt(~background) if background.any() else np.full(bg.shape, np.inf)
    mask = seeds | ((~background) & (d_body <= d_bg + params.band_bias))
    if params.split_h > 0:
        depth = ndi.distance_transform_edt(seeds)
        peaks = h_maxima_by_region(ndi.gaussian_filter(depth, 1.0), params.split_h) > 0
        markers, _ = ndi.label(peaks & seeds)
        elevation = -ndi.distance_transform_edt(mask)
    else:
        elevation = edge - body
    labels = watershed(elevation, markers, mask=mask).astype(np.int32)
    drop = np.zeros(int(labels.max()) + 1, bool)
    if params.min_area > 1:
        drop |= np.bincount(labels.ravel(), minlength=drop.size) < params.min_area
    if params.max_diameter > 0:
        drop |= centroid_radius(labels) > params.max_diameter / 2.0 - 1.0
    drop[0] = False
    if drop.any():
        labels[drop[labels]] = 0
    return relabel(labels)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Renumber labels to 1..n in order of first appearance-free sorted ids."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[labels]
