"""Input convention shared by training and inference.

Every image becomes one grayscale channel in [0, 1] in which nuclei are
bright: RGB is averaged with luminance weights; brightfield images (bright
background, dark nuclei) are inverted so that they look like fluorescence;
then intensities are stretched between the 1st and 99.8th percentile.

Weights whose generator takes three input channels (``generator.in_channels: 3``)
also see the **red and blue** channels of a brightfield colour image, inverted and
stretched the same way, each on its own (:func:`normalize_channels`). Luminance
weighs eosin (absorbing green) almost as much as hematoxylin (absorbing red), so
on H&E pink stroma is as dark as a nucleus; the red channel separates them, and
the blue one keeps DAB-brown (IHC) nuclei visible. For gray, fluorescence and
gray-brightfield images the extra channels repeat the gray one, so they carry no
colour that the network could misread.

Brightfield is recognised by its median luminance: most pixels of a
brightfield image are bright background or pale tissue (median above 30 % of
full scale; >= 40 % on every DSB2018 brightfield image), while most pixels of a
fluorescence image are dark background (median <= 17 % on DSB2018). This is the
same rule as :func:`nucli.postprocess.detect_polarity`.
"""

from __future__ import annotations

import numpy as np

LOW_PCT = 1.0
HIGH_PCT = 99.8
BRIGHTFIELD_MEDIAN = 0.3  # median luminance (fraction of full scale) above which an image is brightfield
MIN_RANGE = 16.0  # uint8 units: never stretch a nearly flat image into noise
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W) float32 in 0..255."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        return img.astype(np.float32)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        return img[..., :3].astype(np.float32) @ _LUMA
    raise ValueError(f"expected a 2-D gray or (H, W, 3) RGB image, got shape {img.shape}")


def is_brightfield(gray: np.ndarray) -> bool:
    """True when the image has a bright background (nuclei darker than it)."""
    if gray.size == 0:
        return False
    sample = gray[::2, ::2] if gray.size > 65536 else gray
    return bool(np.median(sample) > BRIGHTFIELD_MEDIAN * 255.0)


#: the input channels of a three-channel generator: luminance, then the red and blue channels
#: (brightfield colour only; otherwise copies of the gray channel)
COLOR_CHANNELS = ("gray", "red", "blue")


def _stretch(gray: np.ndarray) -> np.ndarray:
    """Percentile stretch of one channel (0..255 float32) to [0, 1]."""
    sample = gray[::2, ::2] if gray.size > 65536 else gray
    lo, hi = np.percentile(sample, [LOW_PCT, HIGH_PCT])
    hi = max(hi, lo + MIN_RANGE)
    out = (gray - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def normalize(image: np.ndarray, invert: bool | None = None) -> np.ndarray:
    """Image -> (H, W) float32 in [0, 1], nuclei bright. ``invert=None`` decides automatically."""
    gray = to_gray(image)
    if invert is None:
        invert = is_brightfield(gray)
    if invert:
        gray = 255.0 - gray
    return _stretch(gray)


def normalize_channels(image: np.ndarray, channels: int = 1, invert: bool | None = None) -> np.ndarray:
    """Image -> (channels, H, W) float32 in [0, 1]: :data:`COLOR_CHANNELS` (``channels`` 1 or 3).

    Channel 0 is :func:`normalize`. For a brightfield colour image channels 1 and 2 are its red
    and blue channels, inverted and stretched like channel 0; for any other image they repeat it.
    """
    if channels not in (1, 3):
        raise ValueError(f"a gensegnet generator takes 1 or 3 input channels, not {channels}")
    img = np.asarray(image)
    gray = to_gray(img)
    if invert is None:
        invert = is_brightfield(gray)
    first = _stretch(255.0 - gray if invert else gray)
    out = np.empty((channels,) + first.shape, np.float32)
    out[0] = first
    colour = invert and img.ndim == 3 and img.shape[-1] in (3, 4)
    for c, rgb_index in zip(range(1, channels), (0, 2)):
        out[c] = _stretch(255.0 - img[..., rgb_index].astype(np.float32)) if colour else first
    return out


def normalize_batch(tiles: np.ndarray, channels: int = 1) -> np.ndarray:
    """(B, H, W, 3) or (B, H, W) uint8 -> each tile normalised on its own.

    ``channels`` 1: (B, H, W) float32 (:func:`normalize`); 3: (B, 3, H, W) (:func:`normalize_channels`).
    """
    if channels == 1:
        return np.stack([normalize(t) for t in np.asarray(tiles)]) if len(tiles) else np.zeros((0, 1, 1), np.float32)
    if not len(tiles):
        return np.zeros((0, channels, 1, 1), np.float32)
    return np.stack([normalize_channels(t, channels) for t in np.asarray(tiles)])
