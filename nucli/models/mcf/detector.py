"""The detection branch, vectorised with FFTs: prepared image -> response map -> centres.

All filters work on the feature grid (one cell = ``cell`` px). Because the
CFF/MFF weighting is a correlation of a response map with a weight template,
and a response map is itself a correlation of the features with a filter, the
weighting folds into the filter: the effective kernel of crop u of scale k is
``crop_u(h_k) * G_{k,u}`` (a small 2-D convolution, done once when the
detector is built). When every crop is kept (U <= T), CFF's top-T is a plain
sum and MFF's ``G_k`` weighting is linear too, so each (template, scale) pair
collapses into one kernel ``(sum_u crop_u(h_k) * G_{k,u}) * G_k``; otherwise
the crops are kept apart, top-T is taken, and ``G_k`` is applied with one
more FFT per (template, scale).

Per image: D feature FFTs, one product-sum with the kernels' cached spectra
(per feature-map shape), one inverse FFT per (template, scale[, crop]), then
top-T over scales, top-H over templates, bilinear upsampling to pixels,
normalisation, and the gradient-direction post-processing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nucli.models.mcf import centres as ctr
from nucli.models.mcf.fusion import CROPS, G_SIGMA_FRAC, crop_centre, crop_sizes, zero_sum_gaussian

log = logging.getLogger("nucli.mcf")

MAX_PAD_CELLS = 24
CACHE_SHAPES = 2


@dataclass
class DetectorParams:
    cell: int = 2
    n_orient: int = 6
    n_levels: int = 3
    k: int = 5  # scales
    scale_span: float = 1.0  # octaves covered by the K scales
    sigma_frac: float = 0.25  # desired-response sigma / nucleus diameter
    lam: float = 0.1  # relative ridge regulariser
    crops: tuple[float, ...] = CROPS  # U centre crops (fractions of the filter side)
    t: int = 3  # top-T (CFF over crops, MFF over scales)
    h: int = 3  # top-H over templates
    p: int = ctr.P_DEFAULT
    q: int = ctr.Q_DEFAULT
    g_sigma_frac: float = G_SIGMA_FRAC
    min_response: float = 0.4  # a centre's normalised response must reach t1
    norm_floor: float = 0.0  # absolute floor of the normaliser (set from the templates' self-response)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "DetectorParams":
        d = dict(d or {})
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "crops" in known:
            known["crops"] = tuple(float(c) for c in known["crops"])
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @property
    def feat_kw(self) -> dict[str, int]:
        return {"n_orient": self.n_orient, "n_levels": self.n_levels}


@dataclass
class Detection:
    response: np.ndarray  # (H, W) float32 normalised response S~ in [0, 1]
    centres: np.ndarray  # (n, 2) int64 (row, col)
    accumulated: np.ndarray  # (H, W) float32 D
    raw_max: float = 0.0  # max of the fused response before normalisation
    template_maps: np.ndarray | None = field(default=None, repr=False)  # (N, h, w) per-template MFF maps (cells)


def _conv_full(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-channel full 2-D convolution of (D, s, s) with (t, t) -> (D, s+t-1, s+t-1)."""
    from scipy.signal import fftconvolve

    return fftconvolve(a.astype(np.float64), b[None].astype(np.float64), mode="full", axes=(1, 2))


def _pad_to(a: np.ndarray, side: int) -> np.ndarray:
    p = (side - a.shape[-1]) // 2
    return np.pad(a, ((0, 0), (p, p), (p, p))) if p else a


class Detector:
    """Filters ``[n][k]`` (D, s, s) + params -> responses and centres for any image size."""

    def __init__(self, filters: list[list[np.ndarray]], params: DetectorParams):
        if not filters or not filters[0]:
            raise ValueError("the detector needs at least one filter")
        self.params = params
        self.n = len(filters)
        self.k = len(filters[0])
        self.sizes = [[int(f.shape[-1]) for f in row] for row in filters]
        self.fast = len(params.crops) <= params.t
        kernels, self.g_scales = [], []
        for row in filters:
            for h in row:
                s = h.shape[-1]
                g = zero_sum_gaussian(s, params.g_sigma_frac)
                self.g_scales.append(g)
                per_crop = [_conv_full(crop_centre(h, c), crop_centre(g, c)) for c in crop_sizes(s, params.crops)]
                if self.fast:
                    side = 2 * s - 1
                    summed = sum(_pad_to(e, side) for e in per_crop)
                    kernels.append(_conv_full(summed, g).astype(np.float32))
                else:
                    kernels.extend(e.astype(np.float32) for e in per_crop)
        self.kernels = kernels
        self.u = 1 if self.fast else len(params.crops)
        self.radius = max(k.shape[-1] // 2 for k in kernels)
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()

    # ------------------------------------------------------------ spectra
    def _geometry(self, hf: int, wf: int) -> tuple[int, int, int]:
        from scipy.fft import next_fast_len

        pad = min(self.radius, MAX_PAD_CELLS)
        side = 2 * self.radius + 1  # every kernel must fit in the FFT
        return (pad, next_fast_len(max(hf + 2 * pad, side), real=True),
                next_fast_len(max(wf + 2 * pad, side), real=True))

    def _spectra(self, hp: int, wp: int):
        import torch

        key = (hp, wp)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        d = self.kernels[0].shape[0]
        spec = torch.empty((d, len(self.kernels), hp, wp // 2 + 1), dtype=torch.complex64)
        for f, kern in enumerate(self.kernels):
            spec[:, f] = torch.fft.rfft2(torch.from_numpy(_embed(kern, hp, wp))).conj_physical()
        g_spec = None
        if not self.fast:
            g_spec = torch.empty((len(self.g_scales), hp, wp // 2 + 1), dtype=torch.complex64)
            for i, g in enumerate(self.g_scales):
                g_spec[i] = torch.fft.rfft2(torch.from_numpy(_embed(g[None].astype(np.float32), hp, wp)[0])
                                            ).conj_physical()
        entry = (spec, g_spec)
        self._cache[key] = entry
        while len(self._cache) > CACHE_SHAPES:
            self._cache.popitem(last=False)
        return entry

    # ------------------------------------------------------------ maps
    def fused_cells(self, feats: np.ndarray, keep_template_maps: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Features (D, hf, wf) -> fused raw response (hf, wf) on the feature grid."""
        import torch

        p = self.params
        d, hf, wf = feats.shape
        pad, hp, wp = self._geometry(hf, wf)
        z = np.zeros((d, hp, wp), np.float32)
        mode = "reflect" if min(hf, wf) > pad else "edge"
        z[:, : hf + 2 * pad, : wf + 2 * pad] = np.pad(feats, ((0, 0), (pad, pad), (pad, pad)), mode=mode)
        spec, g_spec = self._spectra(hp, wp)
        with torch.inference_mode():
            zf = torch.fft.rfft2(torch.from_numpy(z))  # (D, hp, wq)
            prod = spec[0] * zf[0]  # a loop over channels beats einsum here (memory-bound)
            for c in range(1, d):
                prod.addcmul_(spec[c], zf[c])
            maps = torch.fft.irfft2(prod, s=(hp, wp))  # (F, hp, wp)
            if not self.fast:
                maps = maps.view(self.n * self.k, self.u, hp, wp)
                maps = _top_sum(maps, p.t, dim=1)  # CFF
                maps = torch.fft.irfft2(torch.fft.rfft2(maps) * g_spec, s=(hp, wp))  # G_k weighting
            maps = maps[:, pad: pad + hf, pad: pad + wf].reshape(self.n, self.k, hf, wf)
            per_template = _top_sum(maps, p.t, dim=1)  # MFF
            fused = _top_sum(per_template, p.h, dim=0)  # top-H
        return fused.numpy(), (per_template.numpy() if keep_template_maps else None)

    def response(self, prep: np.ndarray, keep_template_maps: bool = False
                 ) -> tuple[np.ndarray, float, np.ndarray | None]:
        """Prepared image (3, H, W) -> (normalised response (H, W), raw max, per-template maps)."""
        import torch
        import torch.nn.functional as F

        from nucli.models.mcf.features import features
        from nucli.models.mcf.fusion import normalise

        p = self.params
        _, h, w = prep.shape
        feats = features(prep, cell=p.cell, **p.feat_kw)
        fused, tmaps = self.fused_cells(feats, keep_template_maps)
        raw_max = float(fused.max(initial=0.0))
        if p.cell > 1:
            up = F.interpolate(torch.from_numpy(fused)[None, None], scale_factor=p.cell, mode="bilinear",
                               align_corners=False)[0, 0, :h, :w].numpy()
        else:
            up = fused[:h, :w]
        return normalise(up, p.norm_floor), raw_max, tmaps

    def detect(self, prep: np.ndarray, keep_template_maps: bool = False) -> Detection:
        s_map, raw_max, tmaps = self.response(prep, keep_template_maps)
        p = self.params
        centres, d_map = ctr.centres_from_response(s_map, p.p, p.q, p.min_response)
        return Detection(s_map, centres, d_map, raw_max, tmaps)

    @property
    def middle_filter_px(self) -> int:
        """Side in px of the middle-scale filter (median over templates): the local patch of the DLT."""
        mid = self.k // 2
        return int(np.median([row[mid] for row in self.sizes])) * self.params.cell


def _embed(kernel: np.ndarray, hp: int, wp: int) -> np.ndarray:
    """Centred kernel (D, e, e) -> (D, hp, wp) with its centre at index (0, 0), wrapped."""
    d, e, _ = kernel.shape
    r = e // 2
    out = np.zeros((d, hp, wp), np.float32)
    if e > min(hp, wp):
        raise ValueError(f"kernel of side {e} does not fit a {hp}x{wp} FFT")
    out[:, :e, :e] = kernel
    return np.roll(out, (-r, -r), axis=(1, 2))


def _top_sum(x, t: int, dim: int):
    """Sum of the ``t`` largest slices along ``dim`` (insertion into a sorted list of ``t``: fast for small t)."""
    import torch

    n = x.shape[dim]
    if t >= n:
        return x.sum(dim=dim)
    xs = x.unbind(dim)
    top = [xs[j].clone() for j in range(t)]
    for i in range(t):  # bubble-sort the first t, largest first
        for j in range(t - 1 - i):
            hi = torch.maximum(top[j], top[j + 1])
            top[j + 1] = torch.minimum(top[j], top[j + 1])
            top[j] = hi
    for v in xs[t:]:  # insert each further slice into the sorted t
        for j in range(t):
            hi = torch.maximum(top[j], v)
            v = torch.minimum(top[j], v)
            top[j] = hi
    out = top[0]
    for j in range(1, t):
        out = out + top[j]
    return out


def calibrate_floor(detector: Detector, templates: list, fraction: float = 0.5) -> float:
    """``fraction`` x the median raw peak response of the templates on their own windows.

    The windows are edge-padded to one common size, so the filters' spectra
    are computed once.
    """
    from nucli.models.mcf.features import features

    if not templates:
        return 0.0
    side = max(t.size for t in templates)
    peaks = []
    for t in templates:
        pad = (side - t.size) // 2
        win = np.pad(t.window, ((0, 0), (pad, side - t.size - pad), (pad, side - t.size - pad)), mode="edge")
        fused, _ = detector.fused_cells(features(win, cell=detector.params.cell, **detector.params.feat_kw))
        peaks.append(float(fused.max(initial=0.0)))
    return float(fraction * np.median(peaks))
