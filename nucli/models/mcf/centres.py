"""Gradient-direction post-processing (paper Eq. 4): nucleus centres from a response map.

A nucleus centre has a response that *falls* in every direction. For each
pixel and each of 8 directions r (right, left, down, up and the four
diagonals; a diagonal step moves one pixel on both axes), with ``S(m)`` the
normalised response ``m`` steps away,

    d_r = sum_{p=1..P} sum_{q=p+1..Q} ( S(p) - S(q) ),

i.e. the response near the pixel (radius ``P``, the nucleus centre) minus the
response farther out (up to radius ``Q``, the nucleus area). The accumulated
map is ``D = sum_r d_r`` where every ``d_r > 0`` and 0 elsewhere. Outside the
image the response counts as 0. Centres are the maxima of ``D`` in each
8-connected region of ``D > 0`` whose response is at least ``min_response``.

The double sum is a fixed weighting of the ``Q`` samples along the ray,
``d_r = sum_m w_m S(m)`` with ``w_m = (Q - m)[m <= P] - min(m - 1, P)``, so
the whole map costs 8 x Q shifted additions.
"""

from __future__ import annotations

import numpy as np

P_DEFAULT = 3
Q_DEFAULT = 10

# (row step, column step) for r = 1..8: right, left, down, up, down-right, up-left, down-left, up-right
DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1))


def ray_weights(p: int = P_DEFAULT, q: int = Q_DEFAULT) -> np.ndarray:
    """Weights ``w_m`` (m = 1..Q) with ``d_r = sum_m w_m S(m)``."""
    if not (1 <= p < q):
        raise ValueError(f"need 1 <= P < Q, got P={p}, Q={q}")
    m = np.arange(1, q + 1)
    return np.where(m <= p, q - m, 0) - np.minimum(m - 1, p)


def direction_gradients(s_map: np.ndarray, p: int = P_DEFAULT, q: int = Q_DEFAULT) -> np.ndarray:
    """(8, H, W) float32: ``d_r`` of every pixel for the 8 directions."""
    import torch

    s_map = np.asarray(s_map, np.float32)
    h, w = s_map.shape
    padded = torch.zeros((h + 2 * q, w + 2 * q), dtype=torch.float32)
    padded[q: q + h, q: q + w] = torch.from_numpy(s_map)
    weights = ray_weights(p, q)
    groups: dict[int, list[int]] = {}
    for m, wm in enumerate(weights, start=1):  # equal weights: add first, multiply once
        if wm:
            groups.setdefault(int(wm), []).append(m)
    out = torch.zeros((8, h, w), dtype=torch.float32)
    for r, (di, dj) in enumerate(DIRECTIONS):
        for wm, ms in groups.items():
            part = None
            for m in ms:
                y0, x0 = q + m * di, q + m * dj
                sl = padded[y0: y0 + h, x0: x0 + w]
                part = sl.clone() if part is None else part.add_(sl)
            out[r].add_(part, alpha=float(wm))
    return out.numpy()


def accumulate(s_map: np.ndarray, p: int = P_DEFAULT, q: int = Q_DEFAULT) -> np.ndarray:
    """Accumulated gradient map ``D`` (H, W): sum of the 8 ``d_r`` where all are positive, else 0."""
    d = direction_gradients(s_map, p, q)
    ok = d.min(axis=0) > 0
    return np.where(ok, d.sum(axis=0), 0.0).astype(np.float32)


def find_centres(s_map: np.ndarray, d_map: np.ndarray, min_response: float = 0.4) -> np.ndarray:
    """(n, 2) int (row, col): the maximum of ``D`` in each region of ``D > 0`` with response >= ``min_response``."""
    from scipy import ndimage as ndi

    d_map = np.asarray(d_map)
    mask = (d_map > 0) & (np.asarray(s_map) >= min_response)
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros((0, 2), np.int64)
    flat = np.flatnonzero(labels)  # only the (few) candidate pixels are sorted
    lab = labels.ravel()[flat]
    val = d_map.ravel()[flat]
    order = np.lexsort((flat, -val, lab))  # by region, then largest D, then raster order
    first = order[np.r_[True, lab[order][1:] != lab[order][:-1]]]
    ys, xs = np.divmod(flat[first], d_map.shape[1])
    return np.stack([ys, xs], axis=1).astype(np.int64)


def centres_from_response(s_map: np.ndarray, p: int = P_DEFAULT, q: int = Q_DEFAULT,
                          min_response: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Normalised response -> (centres (n, 2), accumulated map D)."""
    d_map = accumulate(s_map, p, q)
    return find_centres(s_map, d_map, min_response), d_map
