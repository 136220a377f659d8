"""Instance deformation: each labelled nucleus is resized, rotated and its contour deformed.

One inverse map per nucleus carries both its label and its pixels, so the
deformed texture and the deformed label stay aligned by construction. For a
target pixel at polar coordinates (rho, theta) around the nucleus centroid the
source pixel lies at radius ``rho / (s * (1 + delta(theta - a)))`` and angle
``theta - a``: ``s`` is the random resize factor, ``a`` a random rotation and
``delta`` a smooth random radial profile (a few low harmonics) that bends the
contour. Nuclei are pasted in random order; where two overlap, the later one
wins (label and texture alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DeformParams:
    scale_range: tuple[float, float] = (0.75, 1.3)  # random resize factor (log-uniform)
    contour_amplitude: float = 0.15  # max relative radial bend of the contour
    harmonics: tuple[int, ...] = (2, 3, 4)  # angular frequencies of the bend
    rotate: bool = True
    min_area: int = 8  # deformed nuclei smaller than this (px) are dropped


def _radial_profile(rng: np.random.Generator, p: DeformParams):
    """A random smooth function delta(theta) with |delta| <= contour_amplitude."""
    if p.contour_amplitude <= 0 or not p.harmonics:
        return lambda th: np.zeros_like(th)
    amps = rng.uniform(0, 1, len(p.harmonics))
    amps = amps / max(amps.sum(), 1e-6) * p.contour_amplitude * rng.uniform(0.3, 1.0)
    phases = rng.uniform(0, 2 * np.pi, len(p.harmonics))
    ks = np.asarray(p.harmonics, np.float64)

    def delta(th: np.ndarray) -> np.ndarray:
        return (amps[:, None] * np.cos(ks[:, None] * th.ravel()[None] + phases[:, None])).sum(0).reshape(th.shape)

    return delta


def deform_instances(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                     params: DeformParams = DeformParams()) -> tuple[np.ndarray, np.ndarray]:
    """Deform every nucleus of ``labels``; returns (foreground texture, new labels).

    ``image`` (H, W) or (H, W, C); the foreground is float32 of the same shape,
    valid where the new labels (int32, renumbered 1..n) are non-zero and 0 elsewhere.
    """
    from scipy import ndimage as ndi

    from nucli.postprocess import relabel_sequential

    img = np.asarray(image, dtype=np.float32)
    chan = img if img.ndim == 3 else img[..., None]
    labels = np.asarray(labels)
    h, w = labels.shape
    fg = np.zeros(chan.shape, np.float32)
    out = np.zeros((h, w), np.int32)
    objs = ndi.find_objects(labels.astype(np.int32))
    order = [k for k, sl in enumerate(objs, start=1) if sl is not None]
    rng.shuffle(order)
    lo, hi = np.log(params.scale_range[0]), np.log(params.scale_range[1])
    for k in order:
        sl = objs[k - 1]
        own = labels[sl] == k
        ys, xs = np.nonzero(own)
        cy, cx = ys.mean() + sl[0].start, xs.mean() + sl[1].start
        radius = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) / 2.0 + 1.0
        s = float(np.exp(rng.uniform(lo, hi)))
        a = float(rng.uniform(0, 2 * np.pi)) if params.rotate else 0.0
        delta = _radial_profile(rng, params)
        reach = int(np.ceil(radius * s * (1 + params.contour_amplitude) + 2))
        y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 2, h)
        x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 2, w)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        dy, dx = yy - cy, xx - cx
        rho = np.hypot(dy, dx)
        th = np.arctan2(dy, dx) - a
        src_rho = rho / (s * (1.0 + delta(th)))
        sy, sx = cy + src_rho * np.sin(th), cx + src_rho * np.cos(th)
        # sample from a source window around the nucleus only (cheap on large images)
        sy0, sy1 = max(int(np.floor(sy.min())) - 1, 0), min(int(np.ceil(sy.max())) + 2, h)
        sx0, sx1 = max(int(np.floor(sx.min())) - 1, 0), min(int(np.ceil(sx.max())) + 2, w)
        if sy1 <= sy0 or sx1 <= sx0:
            continue
        own_src = (labels[sy0:sy1, sx0:sx1] == k).astype(np.float32)
        coords = np.stack([sy - sy0, sx - sx0])
        inside = ndi.map_coordinates(own_src, coords, order=0, mode="constant", cval=0) > 0
        if not inside.any():
            continue
        # texture: bilinear over the nucleus's own pixels only (normalised), so no background bleeds in
        den = ndi.map_coordinates(own_src, coords, order=1, mode="constant", cval=0)
        win = (slice(y0, y1), slice(x0, x1))
        out[win][inside] = k
        for c in range(chan.shape[2]):
            num = ndi.map_coordinates(chan[sy0:sy1, sx0:sx1, c] * own_src, coords, order=1, mode="constant", cval=0)
            fg[win + (c,)][inside] = num[inside] / np.maximum(den[inside], 1e-6)
    if params.min_area > 1 and out.any():
        area = np.bincount(out.ravel())
        small = area < params.min_area
        small[0] = False
        out[small[out]] = 0
    fg[out == 0] = 0.0
    out = relabel_sequential(out)
    return (fg if img.ndim == 3 else fg[..., 0]), out


def blur_mask(labels: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Soft blending weight: the nucleus mask blurred by a Gaussian of ``sigma`` px.

    Its 0.5 level follows the mask contour, so blending with it keeps the
    label aligned while hiding the cut-out edge.
    """
    from scipy import ndimage as ndi

    m = (np.asarray(labels) > 0).astype(np.float32)
    if sigma <= 0:
        return m
    return np.clip(ndi.gaussian_filter(m, sigma), 0.0, 1.0)
