"""Response-map fusion (paper Eqs. 2-3): CFF over crops, MFF over scales, top-H over templates.

Notation: ``S_{k,u}`` is the response of template n's scale-k filter cropped
to its u-th centre patch. With ``G_k`` a zero-sum Gaussian-shaped weight
template of the k-th filter's size and ``G_{k,u}`` its u-th centre crop,

* CFF: ``S_k(p) = top-T sum over u of  sum_t G_{k,u}(t) S_{k,u}(p + t)``
* MFF: ``S^n(p) = top-T sum over k of  sum_t G_k(t) S_k(p + t)``
* final: ``S(p) = top-H sum over n of S^n(p)``, then ``norm(S)`` to [0, 1].

A zero-sum weight template scores how much a response *stands out* from its
neighbourhood of one filter size (a Gaussian-weighted mean minus the window
mean): flat high responses (large bright areas, the gaps between crowded
nuclei) cancel, isolated peaks survive. Top-T / top-H keep only the best
matching crops, scales and templates at each pixel, so an unmatched filter
cannot drag a response down or up.

The functions here are the plain spatial definitions, used by the tests and
as the reference for the FFT implementation in :mod:`nucli.models.mcf.detector`
(which folds the weight templates into the filters' spectra).
"""

from __future__ import annotations

import numpy as np

G_SIGMA_FRAC = 1.0 / 6.0  # Gaussian sigma as a fraction of the weight template's side
CROPS = (1.0, 0.75, 0.5)  # CFF centre-crop sizes as fractions of the filter side


def zero_sum_gaussian(s: int, sigma_frac: float = G_SIGMA_FRAC) -> np.ndarray:
    """(s, s) Gaussian-shaped weights summing to exactly 0 (positive part sums to ~1)."""
    r = np.arange(s, dtype=np.float64) - (s - 1) / 2.0
    sigma = max(sigma_frac * s, 0.5)
    g = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / sigma ** 2)
    g /= g.sum()
    g -= g.mean()
    return g.astype(np.float64)


def crop_sizes(s: int, fractions: tuple[float, ...] = CROPS) -> list[int]:
    """Odd centre-crop sides (at least 3, at most ``s``) for a filter of side ``s``."""
    out = []
    for f in fractions:
        c = min(max(int(round(s * float(f))), 3), s)
        if c % 2 == 0:
            c = c + 1 if c + 1 <= s else c - 1
        out.append(c)
    return out


def crop_centre(a: np.ndarray, size: int) -> np.ndarray:
    """Centre ``size`` x ``size`` patch of the last two axes (odd sides)."""
    h, w = a.shape[-2:]
    y0, x0 = (h - size) // 2, (w - size) // 2
    return a[..., y0: y0 + size, x0: x0 + size]


def weighted_patch_sum(s_map: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``out(p) = sum_t g(t) s_map(p + t)`` over the patch centred at p (zero outside the map)."""
    from scipy import ndimage as ndi

    return ndi.correlate(np.asarray(s_map, np.float64), np.asarray(g, np.float64), mode="constant", cval=0.0)


def top_sum(stack: np.ndarray, t: int, axis: int = 0) -> np.ndarray:
    """Sum of the ``t`` largest values along ``axis`` (all of them when ``t`` >= their number)."""
    stack = np.asarray(stack)
    n = stack.shape[axis]
    if t >= n:
        return stack.sum(axis=axis)
    part = np.partition(stack, n - t, axis=axis)
    return np.take(part, np.arange(n - t, n), axis=axis).sum(axis=axis)


def cff(crop_maps: list[np.ndarray], g_k: np.ndarray, sizes: list[int], t: int) -> np.ndarray:
    """CFF map of one scale from the responses of its U cropped filters.

    ``crop_maps[u]`` is the response of the crop of side ``sizes[u]``; it is
    weighted with ``crop_centre(g_k, sizes[u])``.
    """
    raise_if_empty(crop_maps)
    return top_sum(np.stack([weighted_patch_sum(m, crop_centre(g_k, s)) for m, s in zip(crop_maps, sizes)]), t)


def mff(scale_maps: list[np.ndarray], g_scales: list[np.ndarray], t: int) -> np.ndarray:
    """MFF map of one template from its K CFF maps and their weight templates ``G_k``."""
    raise_if_empty(scale_maps)
    return top_sum(np.stack([weighted_patch_sum(m, g) for m, g in zip(scale_maps, g_scales)]), t)


def top_h(template_maps: list[np.ndarray], h: int) -> np.ndarray:
    """Final map: per pixel, the sum of the ``h`` best templates' MFF maps."""
    raise_if_empty(template_maps)
    return top_sum(np.stack(template_maps), h)


def normalise(s_map: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Map to [0, 1]: negatives to 0, divided by ``max(max(S), floor)``.

    ``floor`` (> 0) keeps a tile without any nucleus from being stretched so
    that its best background wiggle reads as a full-strength nucleus.
    """
    s_map = np.asarray(s_map, np.float32)
    top = max(float(s_map.max(initial=0.0)), float(floor), 1e-12)
    return np.clip(s_map / top, 0.0, 1.0).astype(np.float32)


def raise_if_empty(maps: list) -> None:
    if len(maps) == 0:
        raise ValueError("nothing to fuse")
