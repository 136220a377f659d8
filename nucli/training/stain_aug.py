"""Stain and acquisition augmentation for training crops (RGB uint8 + aligned instance labels).

Brightfield crops are augmented in optical-density space (Ruifrok & Johnston's
hematoxylin / eosin / DAB vectors, as :func:`skimage.color.rgb2hed`):

* the amounts of hematoxylin and eosin are scaled and shifted per crop, and the
  stain vectors themselves are perturbed (their hue);
* with probability ``p_ihc`` the crop becomes a simulated IHC image: the eosin
  counterstain is mostly removed and a random subset of the *annotated* nuclei
  is stained DAB-brown (the label image says which pixels are nuclei, so the
  labels stay exactly aligned: nothing moves, only colours change).

Every crop (fluorescence too) may then be blurred, JPEG-compressed, given
Gaussian noise and a gamma change. Geometry (flips, 90° turns, scale jitter) is
applied by the sampler to image and labels together, before this module.
"""

from __future__ import annotations

import io

import numpy as np

#: rows: hematoxylin, eosin, DAB optical-density vectors (skimage.color's hed_from_rgb inverse)
STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
STAINS = STAINS / np.linalg.norm(STAINS, axis=1, keepdims=True)
_OD_MAX = np.log(256.0)


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> optical density (H, W, 3) float64, 0 for white."""
    return -np.log((rgb.astype(np.float64) + 1.0) / 256.0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Optical density -> (H, W, 3) uint8."""
    rgb = 256.0 * np.exp(-np.clip(od, 0.0, _OD_MAX)) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def stain_concentrations(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) hematoxylin, eosin, DAB concentrations (OD units)."""
    od = rgb_to_od(rgb)
    return od.reshape(-1, 3) @ np.linalg.inv(STAINS) if od.size else od.reshape(-1, 3)


def hed_augment(rgb: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
                h_range: tuple[float, float] = (0.7, 1.3), e_range: tuple[float, float] = (0.5, 1.5),
                hue_sigma: float = 0.05, p_ihc: float = 0.25) -> tuple[np.ndarray, bool]:
    """One random stain perturbation of a brightfield crop; returns (rgb, whether it became IHC-like)."""
    h, w = rgb.shape[:2]
    c = stain_concentrations(rgb).reshape(h, w, 3)
    c[..., 0] = c[..., 0] * rng.uniform(*h_range) + rng.uniform(-0.03, 0.03)
    c[..., 1] = c[..., 1] * rng.uniform(*e_range) + rng.uniform(-0.03, 0.03)
    ihc = bool(rng.random() < p_ihc)
    if ihc:
        c[..., 1] *= rng.uniform(0.0, 0.3)  # a hematoxylin counterstain with little or no eosin
        c[..., 2] = np.maximum(c[..., 2], 0.0) * 0.2
        ids = np.unique(labels)
        ids = ids[ids > 0]
        if ids.size:
            frac = rng.uniform(0.1, 0.8)
            pos = ids[rng.random(ids.size) < frac]
            if pos.size:
                strength = np.zeros(int(labels.max()) + 1)
                strength[pos] = rng.uniform(0.2, 1.0, pos.size)
                from scipy import ndimage as ndi

                dab = ndi.gaussian_filter(strength[labels], 0.8)
                c[..., 2] += dab * (0.6 + 0.4 * rng.random((h, w)))
                c[..., 0] *= np.where(strength[labels] > 0, rng.uniform(0.4, 0.9), 1.0)  # DAB masks hematoxylin
    stains = STAINS + rng.normal(0.0, hue_sigma, STAINS.shape)
    stains = np.abs(stains) / np.linalg.norm(stains, axis=1, keepdims=True)
    od = np.clip(c, 0.0, None).reshape(-1, 3) @ stains
    return od_to_rgb(od.reshape(h, w, 3)), ihc


def acquisition_augment(rgb: np.ndarray, rng: np.random.Generator, *, p_blur: float = 0.3, p_jpeg: float = 0.3,
                        p_noise: float = 0.3) -> np.ndarray:
    """Blur, JPEG compression and Gaussian noise, each with its own probability (uint8 in, uint8 out)."""
    out = rgb
    if rng.random() < p_blur:
        from scipy import ndimage as ndi

        s = float(rng.uniform(0.4, 1.5))
        out = np.clip(np.rint(ndi.gaussian_filter(out.astype(np.float32), (s, s, 0))), 0, 255).astype(np.uint8)
    if rng.random() < p_jpeg:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(30, 91)))
        buf.seek(0)
        out = np.asarray(Image.open(buf).convert("RGB"))
    if rng.random() < p_noise:
        sigma = float(rng.uniform(1.0, 8.0))
        out = np.clip(np.rint(out.astype(np.float32) + rng.normal(0.0, sigma, out.shape)), 0, 255).astype(np.uint8)
    return out
