"""Pixel inputs and dense features for the correlation filters.

An image first becomes a *prepared* array (3, H, W) float32:

* channel 0: the shared nucleus-bright grey image of every nucli method
  (:func:`nucli.models.gensegnet.preprocess.normalize`: luminance, brightfield
  inverted, 1st-99.8th percentile stretch to [0, 1]);
* channels 1-2: opponent chroma of the raw RGB in [0, 1],
  ``o1 = (R - G) / sqrt(2)`` and ``o2 = (R + G - 2B) / sqrt(6)`` (both 0 for a
  grey image). They carry the stain colour (hematoxylin blue-purple vs eosin
  pink) that the grey channel loses.

Features (:func:`features`) are computed on that array at a stride of ``cell``
pixels (a HOG cell), ``D = n_orient + n_levels + 2`` channels:

* **HOG-like gradient orientation** (``n_orient`` channels, default 6): the
  gradient of the lightly smoothed grey channel, its magnitude split between
  the two nearest of ``n_orient`` *signed* orientation bins (linear
  interpolation), each bin box-pooled over ``2 * cell`` pixels. Signed bins
  keep the radial in/out structure of a blob's rim. There is no per-block
  contrast normalisation: the grey channel is already stretched per image, and
  block normalisation would blow up noise in flat background.
* **Colour feature** standing in for the Colour Names lookup table (an 11-word
  table learned from web images that is not available here): ``n_levels``
  (default 3) *grey-level names* -- soft triangular memberships of the grey
  value to the levels 0, 1/(n-1), ..., 1 (they sum to 1, like Colour Names'
  probabilities) -- plus the two opponent chroma channels. All box-pooled like
  the orientation bins.

Everything here is a pure function of arrays; torch does the filtering.
"""

from __future__ import annotations

import math

import numpy as np

N_ORIENT = 6
N_LEVELS = 3
CELL = 2
HOG_GAIN = 4.0  # orientation channels are scaled to the range of the memberships
CHROMA_GAIN = 2.0


def n_channels(n_orient: int = N_ORIENT, n_levels: int = N_LEVELS) -> int:
    return int(n_orient) + int(n_levels) + 2


def prepare(image: np.ndarray) -> np.ndarray:
    """(H, W) grey or (H, W, 3|4) uint8 RGB -> (3, H, W) float32 [grey, o1, o2]."""
    from nucli.models.gensegnet.preprocess import normalize

    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    grey = normalize(img)
    out = np.zeros((3,) + grey.shape, np.float32)
    out[0] = grey
    if img.ndim == 3 and img.shape[-1] >= 3:
        rgb = img[..., :3].astype(np.float32) / 255.0
        out[1] = (rgb[..., 0] - rgb[..., 1]) / math.sqrt(2.0)
        out[2] = (rgb[..., 0] + rgb[..., 1] - 2.0 * rgb[..., 2]) / math.sqrt(6.0)
    return out


def prepare_crop(image: np.ndarray) -> np.ndarray:
    """Prepare a tight crop around one nucleus (polarity from centre vs border).

    A crop is mostly nucleus, so the whole-image rule (median luminance) cannot
    tell brightfield from fluorescence. Here the crop is brightfield when its
    centre is darker than its border; the grey channel is stretched between the
    border median (background -> 0) and the 99.8th percentile (nucleus -> 1).
    """
    from nucli.models.gensegnet.preprocess import to_gray

    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    grey = to_gray(img)
    h, w = grey.shape
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    centre = grey[h // 4: h - h // 4 or h, w // 4: w - w // 4 or w]
    if float(np.median(centre)) < float(np.median(border)):
        grey = 255.0 - grey
        border = 255.0 - border
    lo = float(np.median(border))
    hi = max(float(np.percentile(grey, 99.8)), lo + 16.0)
    out = np.zeros((3, h, w), np.float32)
    out[0] = np.clip((grey - lo) / (hi - lo), 0.0, 1.0)
    if img.ndim == 3 and img.shape[-1] >= 3:
        rgb = img[..., :3].astype(np.float32) / 255.0
        out[1] = (rgb[..., 0] - rgb[..., 1]) / math.sqrt(2.0)
        out[2] = (rgb[..., 0] + rgb[..., 1] - 2.0 * rgb[..., 2]) / math.sqrt(6.0)
    return out


def _gauss1d(sigma: float):
    import torch

    r = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _smooth(x, sigma: float):
    """Separable Gaussian blur of (C, H, W) torch tensor, reflect padding."""
    import torch.nn.functional as F

    if sigma <= 0:
        return x
    k = _gauss1d(sigma)
    r = (k.numel() - 1) // 2
    c = x.shape[0]
    y = x[None]
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    y = F.pad(y, (r, r, 0, 0), mode=mode)
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode=mode)
    y = F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return y[0]


def features(prep: np.ndarray, cell: int = CELL, n_orient: int = N_ORIENT, n_levels: int = N_LEVELS,
             grad_sigma: float = 1.0) -> np.ndarray:
    """(3, H, W) prepared image -> (D, ceil(H / cell), ceil(W / cell)) float32 features.

    Feature cell ``(a, b)`` describes the pixels around ``(a * cell + (cell - 1) / 2,
    b * cell + (cell - 1) / 2)``.
    """
    import torch
    import torch.nn.functional as F

    p = torch.from_numpy(np.ascontiguousarray(prep, dtype=np.float32))
    grey = p[0:1]
    h, w = grey.shape[-2:]
    gs = _smooth(grey, grad_sigma)[0]
    gy = torch.zeros_like(gs)
    gx = torch.zeros_like(gs)
    if h > 2:
        gy[1:-1] = 0.5 * (gs[2:] - gs[:-2])
    if w > 2:
        gx[:, 1:-1] = 0.5 * (gs[:, 2:] - gs[:, :-2])
    mag = torch.sqrt(gx * gx + gy * gy)
    ang = torch.atan2(gy, gx) % (2.0 * math.pi)  # signed orientation in [0, 2pi)
    pos = ang / (2.0 * math.pi / n_orient)
    lo = torch.floor(pos).long() % n_orient
    frac = pos - torch.floor(pos)
    hi = (lo + 1) % n_orient
    chans = torch.zeros((n_channels(n_orient, n_levels), h, w), dtype=torch.float32)
    chans[:n_orient].scatter_add_(0, lo[None], (mag * (1.0 - frac))[None])
    chans[:n_orient].scatter_add_(0, hi[None], (mag * frac)[None])
    chans[:n_orient] *= HOG_GAIN
    # grey-level names: triangular memberships to n_levels evenly spaced levels
    g = grey[0].clamp(0.0, 1.0) * (n_levels - 1)
    for j in range(n_levels):
        chans[n_orient + j] = torch.clamp(1.0 - torch.abs(g - j), min=0.0)
    chans[n_orient + n_levels:] = p[1:3] * CHROMA_GAIN
    # box pooling over 2 * cell px, sampled every cell px
    k = 2 * cell
    pad_t, pad_l = (k - cell) // 2, (k - cell) // 2
    hp, wp = -(-h // cell) * cell, -(-w // cell) * cell
    x = F.pad(chans[None], (pad_l, wp - w + (k - cell) - pad_l, pad_t, hp - h + (k - cell) - pad_t),
              mode="replicate")
    out = F.avg_pool2d(x, kernel_size=k, stride=cell)[0]
    return out[:, : -(-h // cell), : -(-w // cell)].contiguous().numpy()
