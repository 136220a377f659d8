"""Pre-synthesis: background + deformed nuclei combined in HED colour space.

``ID(x) = alpha * N(x) + (1 - alpha) * B(x)`` where B is the image with its
nuclei inpainted away (:mod:`nucli.synth.background`), N the deformed nuclei
with their own real textures (:mod:`nucli.synth.deform`) and alpha the blurred
deformed mask. For colour brightfield images the blend is done on the
Hematoxylin-Eosin-DAB densities (skimage's ``rgb2hed`` matrix, unclipped) after a
random per-channel gain and shift: hematoxylin of the nuclei, eosin of the
background, so that stain strength varies independently. Gray brightfield and
fluorescence images have no stains to separate: they are blended in intensity
with a random per-channel gain instead. The deformed labels are the new labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nucli.synth.deform import DeformParams, blur_mask, deform_instances


@dataclass(frozen=True)
class ComposeParams:
    deform: DeformParams = field(default_factory=DeformParams)
    mask_blur: float = 1.0  # px, sigma of the blending weight
    nucleus_h_gain: tuple[float, float] = (0.75, 1.3)  # hematoxylin of the nuclei
    nucleus_e_gain: tuple[float, float] = (0.85, 1.15)
    background_e_gain: tuple[float, float] = (0.7, 1.3)  # eosin of the background
    background_h_gain: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.02  # OD units, per channel
    intensity_gain: tuple[float, float] = (0.8, 1.2)  # fluorescence / gray: per-channel gain


_LOG_ADJUST = float(np.log(1e-6))


def rgb_to_hed(rgb01: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] -> HED stain densities (``skimage.color``'s Ruifrok-Johnston matrix).

    Like ``skimage.color.rgb2hed`` but without clipping negative densities, so
    that :func:`hed_to_rgb` inverts it exactly (colours outside the stains'
    cone would otherwise change on the round trip).
    """
    from skimage.color import hed_from_rgb

    return (np.log(np.maximum(rgb01, 1e-6)) / _LOG_ADJUST) @ hed_from_rgb


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hed`; RGB clipped to [0, 1]."""
    from skimage.color import rgb_from_hed

    return np.clip(np.exp((hed * _LOG_ADJUST) @ rgb_from_hed), 0.0, 1.0)


def image_kind(rgb: np.ndarray) -> str:
    """'hed' for colour brightfield, 'dark' for gray brightfield, 'bright' for fluorescence."""
    from nucli.postprocess import BRIGHTFIELD, as_rgb, detect_polarity

    rgb = as_rgb(rgb)
    if detect_polarity(rgb) != BRIGHTFIELD:
        return "bright"
    spread = np.abs(rgb.astype(np.int16) - rgb.astype(np.int16).mean(axis=2, keepdims=True)).mean()
    return "hed" if spread > 3.0 else "dark"


def compose(background: np.ndarray, foreground: np.ndarray, alpha: np.ndarray, kind: str,
            rng: np.random.Generator, params: ComposeParams = ComposeParams()) -> np.ndarray:
    """Blend float RGB background and foreground (0-255) with weight ``alpha``; returns uint8 RGB."""
    a = np.asarray(alpha, np.float32)[..., None]
    bg = np.asarray(background, np.float32)
    fgi = np.asarray(foreground, np.float32)
    if kind == "hed":
        u = rng.uniform
        hb = rgb_to_hed(np.clip(bg / 255.0, 0, 1))
        hf = rgb_to_hed(np.clip(fgi / 255.0, 0, 1))
        gain_f = np.array([u(*params.nucleus_h_gain), u(*params.nucleus_e_gain), 1.0])
        gain_b = np.array([u(*params.background_h_gain), u(*params.background_e_gain), 1.0])
        shift_f = rng.uniform(-params.shift, params.shift, 3) * np.array([1, 1, 0])
        shift_b = rng.uniform(-params.shift, params.shift, 3) * np.array([1, 1, 0])
        hed = a * (hf * gain_f + shift_f) + (1 - a) * (hb * gain_b + shift_b)
        out = hed_to_rgb(hed) * 255.0
    else:
        gray = np.allclose(bg[..., 0], bg[..., 1]) and np.allclose(bg[..., 1], bg[..., 2])
        g = rng.uniform(*params.intensity_gain, 1 if gray else 3)
        gb = rng.uniform(0.9, 1.1, 1 if gray else 3)
        if kind == "dark":  # brightfield gray: stain darkens, so scale the darkness, not the brightness
            out = 255.0 - (a * (255.0 - fgi) * g + (1 - a) * (255.0 - bg) * gb)
        else:
            out = a * fgi * g + (1 - a) * bg * gb
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def pre_synthesize(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                   params: ComposeParams = ComposeParams()) -> tuple[np.ndarray, np.ndarray]:
    """A real (image, labels) pair -> a new pair ``(ID(x) uint8 RGB, deformed labels int32)``."""
    from nucli.postprocess import as_rgb
    from nucli.synth.background import inpaint_background

    rgb = as_rgb(np.asarray(image))
    if rgb.dtype != np.uint8:
        top = max(float(rgb.max()), 1.0)
        rgb = np.clip(rgb.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        from nucli.errors import InputError

        raise InputError(f"labels of shape {labels.shape} do not match the image {rgb.shape[:2]}")
    bg = inpaint_background(rgb, labels > 0, rng=rng)
    fg, new_labels = deform_instances(rgb, labels, rng, params.deform)
    alpha = blur_mask(new_labels, params.mask_blur)
    # outside the nuclei the foreground is the background, so the blurred rim blends background with itself
    fg = np.where((new_labels > 0)[..., None], fg, bg)
    return compose(bg, fg, alpha, image_kind(rgb), rng, params), new_labels
