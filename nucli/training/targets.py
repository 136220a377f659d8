"""Training targets derived from instance labels (GeNSeg-Net).

* :func:`ideal_image` -- the "ideal nucleus" image the enhancement stage learns
  to produce: inside each nucleus the intensity falls from the centre towards
  the edge following the distance transform; pixels on a boundary shared by two
  touching nuclei get one "pending edge" intensity; background is 0.
* :func:`class_map` -- the 3-class map the segmentation stage learns:
  0 background, 1 nucleus body, 2 coarse edge (a band ``2 * half_width`` px
  wide centred on every contour: ``half_width`` px inside, ``half_width`` px
  outside).
"""

from __future__ import annotations

import numpy as np

BACKGROUND, BODY, EDGE = 0, 1, 2

# Intensities of the ideal image.
CENTRE_VALUE = 1.0
RIM_VALUE = 0.45
PENDING_EDGE_VALUE = 0.2


def _shared_boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels of a nucleus that touch (8-neighbourhood) a pixel of another nucleus."""
    from scipy import ndimage as ndi

    lab = labels.astype(np.int64)
    big = np.iinfo(np.int64).max
    hi = ndi.maximum_filter(lab, size=3, mode="constant", cval=0)
    lo_src = np.where(lab == 0, big, lab)
    lo = ndi.minimum_filter(lo_src, size=3, mode="constant", cval=big)
    lo = np.where(lo == big, 0, lo)
    return (lab > 0) & (((hi != lab) & (hi > 0)) | ((lo != lab) & (lo > 0)))


def inner_distance(labels: np.ndarray) -> np.ndarray:
    """Per-pixel Euclidean distance to the nearest pixel outside its own nucleus."""
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    dist = np.zeros(labels.shape, np.float32)
    for idx, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        own = labels[sl] == idx
        # pad so nuclei at the image border still fall off towards it
        d = ndi.distance_transform_edt(np.pad(own, 1))[1:-1, 1:-1]
        dist[sl][own] = d[own]
    return dist


def ideal_image(labels: np.ndarray) -> np.ndarray:
    """Instance labels (H, W) -> ideal-nucleus image (H, W) float32 in [0, 1]."""
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.float32)
    if not labels.any():
        return out
    dist = inner_distance(labels)
    n = int(labels.max())
    dmax = ndi.maximum(dist, labels, index=np.arange(1, n + 1))
    dmax = np.concatenate([[1.0], np.maximum(np.asarray(dmax, np.float32), 1.0)])
    fg = labels > 0
    rel = (dist[fg] - 1.0) / np.maximum(dmax[labels[fg]] - 1.0, 1.0)
    rel = np.clip(rel, 0.0, 1.0)
    # sqrt profile: steep near the rim so the contour is sharp, flat in the centre
    out[fg] = RIM_VALUE + (CENTRE_VALUE - RIM_VALUE) * np.sqrt(rel)
    out[_shared_boundary(labels)] = PENDING_EDGE_VALUE
    return out


def class_map(labels: np.ndarray, half_width: int = 2) -> np.ndarray:
    """Instance labels (H, W) -> uint8 map of BACKGROUND / BODY / EDGE.

    The edge band holds pixels within ``half_width`` px of a contour on both
    sides: nucleus pixels with inner distance <= ``half_width`` and background
    pixels within ``half_width`` px of a nucleus. A nucleus too small to keep
    any body keeps its innermost pixels as body, so every nucleus has a seed.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.uint8)
    if not labels.any():
        return out
    fg = labels > 0
    dist = inner_distance(labels)
    out[fg] = BODY
    out[fg & (dist <= half_width)] = EDGE
    outer = ndi.distance_transform_edt(~fg)
    out[(~fg) & (outer <= half_width)] = EDGE
    # nuclei with no body left: their deepest pixels become body
    n = int(labels.max())
    has_body = ndi.maximum(out == BODY, labels, index=np.arange(1, n + 1))
    dmax = ndi.maximum(dist, labels, index=np.arange(1, n + 1))
    missing = np.flatnonzero(~np.asarray(has_body, bool)) + 1
    if missing.size:
        dm = np.concatenate([[0.0], np.asarray(dmax, np.float32)])
        sel = np.isin(labels, missing) & (dist >= dm[labels] - 1e-6)
        out[sel] = BODY
    return out
