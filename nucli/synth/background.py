"""Background patches: the nuclei of a real image inpainted away.

Fast normalised-convolution inpainting: the hole (the nuclei, dilated a
little) is filled from the surrounding pixels by Gaussian averages of growing
width, ``G(image * valid) / G(valid)``, so each hole pixel takes the colour of
the nearest background; then grain with the background's own fine-scale
standard deviation is added so the fill is not conspicuously smooth. Pixels
outside the hole are returned unchanged.
"""

from __future__ import annotations

import numpy as np


def inpaint_background(image: np.ndarray, mask: np.ndarray, dilate: int = 2,
                       rng: np.random.Generator | None = None, grain: bool = True) -> np.ndarray:
    """(H, W[, C]) image, (H, W) nucleus mask -> float32 image with the nuclei filled by background."""
    from scipy import ndimage as ndi

    img = np.asarray(image, dtype=np.float32)
    chan = img if img.ndim == 3 else img[..., None]
    hole = np.asarray(mask) > 0
    if dilate > 0 and hole.any():
        hole = ndi.binary_dilation(hole, iterations=int(dilate))
    out = chan.copy()
    if not hole.any():
        return out if img.ndim == 3 else out[..., 0]
    valid = (~hole).astype(np.float32)
    if valid.sum() == 0:
        out[:] = np.median(chan.reshape(-1, chan.shape[2]), axis=0)
        return out if img.ndim == 3 else out[..., 0]
    todo = hole.copy()
    sigma = 2.0
    big = max(hole.shape)
    while todo.any() and sigma < 4 * big:
        den = ndi.gaussian_filter(valid, sigma, mode="reflect")
        ok = todo & (den > 1e-3)
        if ok.any():
            for c in range(chan.shape[2]):
                num = ndi.gaussian_filter(chan[..., c] * valid, sigma, mode="reflect")
                out[..., c][ok] = num[ok] / den[ok]
            todo &= ~ok
        sigma *= 2.0
    if todo.any():  # unreachable holes (should not happen): the mean background
        mean = (chan * valid[..., None]).sum((0, 1)) / valid.sum()
        out[todo] = mean
    if grain:
        rng = rng if rng is not None else np.random.default_rng(0)
        fine = chan - np.stack([ndi.gaussian_filter(chan[..., c], 1.0) for c in range(chan.shape[2])], -1)
        far = ~ndi.binary_dilation(hole, iterations=4)  # the residual near nuclei is edge, not grain
        std = fine[far].std(axis=0) if far.sum() > 16 else np.zeros(chan.shape[2], np.float32)
        noise = rng.normal(0.0, 1.0, hole.shape).astype(np.float32)
        noise = ndi.gaussian_filter(noise, 0.7) * 1.6  # slightly correlated grain, unit-ish variance
        out[hole] += noise[hole][:, None] * std[None, :]
    top = 255.0 if np.asarray(image).dtype == np.uint8 else max(float(chan.max()), 1.0)
    out = np.clip(out, 0.0, top)
    out[~hole] = chan[~hole]
    return out if img.ndim == 3 else out[..., 0]
