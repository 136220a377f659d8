"""Closed-form correlation filters, one per template and scale (paper Eq. 1).

For a template window with features ``x`` (D channels, s x s cells, cosine
windowed) and a desired response ``y`` (a Gaussian peak at the nucleus
centre), the ridge-regression filter in the Fourier domain is

    H_c = Y * X_c / (sum_c' |X_c'|^2 + lambda)        (per channel c)

(the multi-channel linear-kernel solution of Henriques et al.; ``Y`` is real
because ``y`` is symmetric). Correlating the template with the filter,
``sum_c IFFT(X_c * conj(H_c))``, gives back ``y`` up to the regulariser.
``lambda`` is relative: ``lam * mean_f sum_c |X_c(f)|^2``, so it does not
depend on the feature scale.

The spatial filter ``h = IFFT(H)`` is aligned with the template: its centre
cell ``s // 2`` is the nucleus centre. Used as a sliding kernel
``r(p) = sum_u z(p + u) h(s//2 + u)``, it responds at nucleus centres.

Scales (MFF): the template window is resized by K factors spread
geometrically over ``scale_span`` octaves around 1 (K=5, span 1 ->
0.71 ... 1.41); a scale-``f`` filter finds nuclei ``f`` times the template's
size. The desired peak's width scales with the nucleus: ``sigma = sigma_frac
* diameter * f`` px.
"""

from __future__ import annotations

import math

import numpy as np

from nucli.models.mcf.templates import CONTEXT, Template

MIN_CELLS = 5


def scale_factors(k: int, span: float = 1.0) -> list[float]:
    """K resize factors, geometric over ``span`` octaves centred on 1."""
    if k <= 1:
        return [1.0]
    return [float(2.0 ** e) for e in np.linspace(-span / 2.0, span / 2.0, k)]


def filter_cells(diameter: float, factor: float, cell: int) -> int:
    """Odd filter side in feature cells for a nucleus of ``diameter`` px at ``factor``."""
    s = int(round(CONTEXT * diameter * factor / cell))
    s = max(s, MIN_CELLS)
    return s if s % 2 else s + 1


def resize(prep: np.ndarray, factor: float) -> np.ndarray:
    """(C, H, W) float32 resized by ``factor`` (bilinear, antialiased when shrinking); odd sides kept odd."""
    import torch
    import torch.nn.functional as F

    if abs(factor - 1.0) < 1e-6:
        return prep
    c, h, w = prep.shape
    nh = max(3, int(round(h * factor)))
    nw = max(3, int(round(w * factor)))
    nh += (nh % 2) != (h % 2)
    nw += (nw % 2) != (w % 2)
    x = torch.from_numpy(np.ascontiguousarray(prep, np.float32))[None]
    y = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=factor < 1.0)
    return y[0].numpy()


def hann(s: int) -> np.ndarray:
    w = np.hanning(s + 2)[1:-1]
    return np.outer(w, w).astype(np.float32)


def gaussian_at_origin(s: int, sigma: float) -> np.ndarray:
    """(s, s) Gaussian with its peak at index (0, 0), circularly wrapped."""
    d = np.arange(s)
    d = np.minimum(d, s - d).astype(np.float64)
    g = np.exp(-0.5 * (d[:, None] ** 2 + d[None, :] ** 2) / max(sigma, 1e-3) ** 2)
    return g.astype(np.float32)


def template_features(t: Template, factor: float, cell: int, feat_kw: dict | None = None) -> np.ndarray:
    """Features (D, s, s) of a template at scale ``factor``, centred on the nucleus."""
    from nucli.models.mcf.features import features

    win = resize(t.window, factor)
    f = features(win, cell=cell, **(feat_kw or {}))
    s = filter_cells(t.diameter, factor, cell)
    centre_px = (win.shape[-1] - 1) / 2.0
    c = int(round((centre_px - (cell - 1) / 2.0) / cell))
    r = s // 2
    pad = max(0, r - c, c + r + 1 - f.shape[-1])
    if pad:
        f = np.pad(f, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
        c += pad
    return np.ascontiguousarray(f[:, c - r: c + r + 1, c - r: c + r + 1])


def train_filter(x: np.ndarray, sigma: float, lam: float = 0.1) -> np.ndarray:
    """Closed-form filter (D, s, s) for template features ``x`` (D, s, s); see the module docstring."""
    d, s, s2 = x.shape
    if s != s2:
        raise ValueError(f"template features must be square, got {x.shape}")
    xw = x.astype(np.float64) * hann(s)[None]
    X = np.fft.fft2(xw)
    Y = np.fft.fft2(gaussian_at_origin(s, sigma).astype(np.float64))
    energy = (np.abs(X) ** 2).sum(axis=0)
    den = energy + lam * float(energy.mean() + 1e-12)
    H = Y[None] * X / den[None]
    return np.real(np.fft.ifft2(H)).astype(np.float32)


def build_filters(templates: list[Template], k: int = 5, scale_span: float = 1.0, cell: int = 2,
                  sigma_frac: float = 0.25, lam: float = 0.1, feat_kw: dict | None = None
                  ) -> list[list[np.ndarray]]:
    """Filters ``[n][k]`` (D, s_nk, s_nk) for every template and scale."""
    out = []
    for t in templates:
        row = []
        for f in scale_factors(k, scale_span):
            x = template_features(t, f, cell, feat_kw)
            row.append(train_filter(x, sigma_frac * t.diameter * f / cell, lam))
        out.append(row)
    return out


def correlate_valid(z: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Reference sliding correlation (slow, for tests): ``r(p) = sum_u z(p+u) h(c+u)``, zero outside."""
    from scipy import ndimage as ndi

    out = np.zeros(z.shape[1:], np.float64)
    for c in range(z.shape[0]):
        out += ndi.correlate(z[c].astype(np.float64), h[c].astype(np.float64), mode="constant", cval=0.0)
    return out.astype(np.float32)


def response_peak_radius(diameter: float, sigma_frac: float) -> float:
    """Radius (px) at which a template's ideal response falls to half its peak."""
    return sigma_frac * diameter * math.sqrt(2.0 * math.log(2.0))
