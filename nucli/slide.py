"""Open any slide or image and read regions at a pixel size (µm/px).

:func:`open_slide` tries, in order:

1. **OpenSlide** (Aperio SVS, Hamamatsu, MIRAX, generic tiled TIFF, DICOM, ...),
2. **tiffslide** for TIFF-based slides OpenSlide does not read,
3. **plain images** (PNG, JPEG, TIFF) through tifffile / scikit-image. TIFFs are
   read lazily through tifffile's Zarr store (only the chunks a region touches are
   decoded); PNG/JPEG are decoded once (they cannot be read in parts).

Every read returns ``(h, w, 3)`` uint8 RGB. Gray images are repeated to three
channels; alpha (RGBA, gray+alpha, OpenSlide's transparent areas) is composited
on :attr:`Slide.background`. Images that are not 8-bit (16-bit, 32-bit, float)
are scaled linearly to 0-255 with ONE scale for the whole image, so tiles agree:
the 0.5th percentile of a sample of the image maps to 0 and the 99.5th to 255
(the sample: the whole image when small, else 64 windows of 128 x 128 px spread
evenly over it).

Pixel size: ``Slide.mpp`` is the ``mpp`` argument when given, else the slide's
metadata (OpenSlide/tiffslide ``mpp-x``; for plain TIFFs the resolution tags in
cm or inch, ImageJ ``unit=micron``, or OME ``PhysicalSizeX``), else ``None``.

Working resolution: a *working pixel size* ``working_mpp`` defines a downsample
``working_mpp / mpp`` (level-0 px per working px). :meth:`Slide.read_working`
reads a region in working pixels: it picks the coarsest pyramid level whose
downsample does not exceed the target, reads only the needed window of that
level, and resamples it once (whole-number factor: block mean; otherwise a
Gaussian anti-alias filter with sigma ``(f - 1) / 2`` followed by bilinear
sampling at the exact pixel centres). The result for a working pixel does not
depend on which region it was read with, so overlapping tiles agree exactly.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from nucli.errors import InputError, UsageError

log = logging.getLogger("nucli.slide")

SNAP_TOLERANCE = 0.05
"""A target downsample within 5 % of a whole number is snapped to it (no resampling blur)."""
LEVEL_TOLERANCE = 1e-3
"""Relative slack when comparing a pyramid level's downsample with a target."""
MAX_READ_PIXELS = 2048 * 2048
"""Largest source window read at once; bigger requests are split (results are identical)."""
PLAUSIBLE_MPP = (0.01, 25.0)
"""Pixel sizes (µm/px) outside this range in a plain image's tags are ignored (e.g. 72 dpi)."""

_FINGERPRINT_BYTES = 64 * 1024


# ---------------------------------------------------------------------- pixel helpers
def _composite(rgba: np.ndarray, background: tuple[int, int, int], alpha_max: float = 255.0) -> np.ndarray:
    """RGB(A) array -> uint8 RGB, alpha composited on ``background``."""
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if np.all(alpha >= alpha_max):
        return np.ascontiguousarray(rgb, dtype=np.uint8)
    a = (alpha.astype(np.float32) / alpha_max)[..., None]
    bg = np.asarray(background, dtype=np.float32)
    out = rgb.astype(np.float32) * a + bg * (1.0 - a)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _fingerprint(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            fh.seek(max(size - _FINGERPRINT_BYTES, _FINGERPRINT_BYTES))
            h.update(fh.read(_FINGERPRINT_BYTES))
    return f"{size}-{h.hexdigest()[:32]}"


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:2] == b"BM":
        return "bmp"
    return None


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    return float(mpp) if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def _block_mean_f32(img: np.ndarray, n: int) -> np.ndarray:
    """Mean of n x n blocks (float32), via integer row sums (fast for uint8)."""
    h, w, c = img.shape[0] // n, img.shape[1] // n, img.shape[2]
    rows = img[: h * n, : w * n].reshape(h, n, w * n * c).sum(axis=1, dtype=np.uint32)
    return rows.reshape(h, w, n, c).sum(axis=2).astype(np.float32) / np.float32(n * n)


def _block_mean(img: np.ndarray, n: int) -> np.ndarray:
    return np.clip(np.round(_block_mean_f32(img, n)), 0, 255).astype(np.uint8)


def _linear_axis(coords: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    i0 = np.floor(coords).astype(np.int64)
    frac = (coords - i0).astype(np.float32)
    i0 = np.clip(i0, 0, size - 1)
    i1 = np.clip(i0 + 1, 0, size - 1)
    return i0, i1, frac


# ---------------------------------------------------------------------- backends
class _Backend:
    name = "?"
    vendor: str | None = None
    mpp: float | None = None
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    properties: dict[str, Any]
    background_hint: tuple[int, int, int] | None = None

    def read_level(self, level: int, x: int, y: int, w: int, h: int, background) -> np.ndarray:
        """In-bounds region of ``level`` in that level's px -> (h, w, 3) uint8."""
        raise NotImplementedError

    def associated_names(self) -> list[str]:
        return []

    def associated(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def close(self) -> None:
        pass


class _OpenSlideBackend(_Backend):
    name = "openslide"

    def __init__(self, path: Path):
        import openslide

        self._os = openslide.OpenSlide(str(path))
        props = dict(self._os.properties)
        self.properties = props
        self.vendor = props.get("openslide.vendor")
        self.level_dimensions = [tuple(map(int, d)) for d in self._os.level_dimensions]
        self.level_downsamples = [float(d) for d in self._os.level_downsamples]
        mx, my = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        try:
            vals = [float(v) for v in (mx, my) if v not in (None, "")]
        except ValueError:
            vals = []
        vals = [v for v in vals if v > 0]
        self.mpp = float(np.mean(vals)) if vals else None
        if len(vals) == 2 and abs(vals[0] - vals[1]) > 0.01 * max(vals):
            log.warning("%s: pixels are not square (mpp-x %s, mpp-y %s); using their mean", path, mx, my)
        bg = props.get("openslide.background-color")
        if bg and re.fullmatch(r"[0-9a-fA-F]{6}", bg):
            self.background_hint = (int(bg[0:2], 16), int(bg[2:4], 16), int(bg[4:6], 16))

    def read_level(self, level, x, y, w, h, background):
        d = self.level_downsamples[level]
        x0 = x if level == 0 else int(round(x * d))
        y0 = y if level == 0 else int(round(y * d))
        img = self._os.read_region((x0, y0), level, (int(w), int(h)))
        return _composite(np.asarray(img), background)

    def associated_names(self):
        return list(self._os.associated_images.keys())

    def associated(self, name):
        return _composite(np.asarray(self._os.associated_images[name].convert("RGBA")), (255, 255, 255))

    def close(self):
        self._os.close()


class _TiffSlideBackend(_Backend):
    name = "tiffslide"

    def __init__(self, path: Path):
        import tiffslide

        self._ts = tiffslide.TiffSlide(str(path))
        props = dict(self._ts.properties)
        self.properties = props
        self.vendor = props.get("tiffslide.vendor")
        self.level_dimensions = [tuple(map(int, d)) for d in self._ts.level_dimensions]
        self.level_downsamples = [float(d) for d in self._ts.level_downsamples]
        vals = [props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")]
        vals = [float(v) for v in vals if isinstance(v, (int, float)) and v and v > 0]
        self.mpp = float(np.mean(vals)) if vals else None
        self._arrays: dict[int, Any] = {}

    def _level_array(self, level: int):
        if level not in self._arrays:
            self._arrays[level] = self._ts.zarr_group[str(level)]
        return self._arrays[level]

    def read_level(self, level, x, y, w, h, background):
        block = np.asarray(self._level_array(level)[y : y + h, x : x + w])
        if block.ndim == 2:
            block = np.repeat(block[..., None], 3, axis=2)
        if block.shape[2] == 4:
            return _composite(block, background)
        return np.ascontiguousarray(block[..., :3], dtype=np.uint8)

    def associated_names(self):
        return list(self._ts.associated_images.keys())

    def associated(self, name):
        return np.asarray(self._ts.associated_images[name].convert("RGB"))

    def close(self):
        self._ts.close()


class _ImageBackend(_Backend):
    """Plain images: TIFF lazily via tifffile+zarr, others decoded once via scikit-image."""

    name = "image"

    def __init__(self, path: Path, kind: str | None):
        self.path = path
        self.properties = {}
        self._tif = None
        self._levels: list[Any] = []  # arrays (zarr or numpy) per level
        self._index: Callable[[slice, slice], tuple] = lambda ys, xs: (ys, xs)
        self._channel_axis_first = False
        if kind == "tiff":
            self._open_tiff(path)
        else:
            self._open_decoded(path)
        self.level_dimensions = []
        self.level_downsamples = []
        for arr in self._levels:
            hh, ww = self._yx_shape(arr)
            self.level_dimensions.append((ww, hh))
        w0, h0 = self.level_dimensions[0]
        for ww, hh in self.level_dimensions:
            self.level_downsamples.append(float((w0 / ww + h0 / hh) / 2.0))
        self._scale = self._intensity_scale()

    # -- opening
    def _open_decoded(self, path: Path) -> None:
        import skimage.io

        try:
            arr = np.asarray(skimage.io.imread(str(path)))
        except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
            raise InputError(f"{path}: cannot decode image ({type(exc).__name__}: {_short(exc)})") from None
        if arr.ndim == 3 and arr.shape[2] > 4 and arr.shape[0] <= 4:
            arr = np.moveaxis(arr, 0, -1)
        self._axes = "YXS" if arr.ndim == 3 else "YX"
        self._levels = [arr]
        self._check_channels(arr.shape[2] if arr.ndim == 3 else 1)

    def _open_tiff(self, path: Path) -> None:
        import tifffile
        import zarr

        tif = tifffile.TiffFile(str(path))
        self._tif = tif
        series = tif.series[0]
        axes = series.axes
        shape = series.shape
        keep = [a for a, n in zip(axes, shape) if n > 1 or a in "YX"]
        extra = [a for a in keep if a not in "YX"]
        if "Y" not in axes or "X" not in axes or len(extra) > 1:
            raise InputError(
                f"{path}: image has axes {axes} {tuple(shape)}; nucli reads 2-D gray, RGB or RGBA images"
            )
        channels = shape[axes.index(extra[0])] if extra else 1
        self._check_channels(channels)
        self._channel_axis_first = bool(extra) and axes.index(extra[0]) < axes.index("Y")
        self._axes = axes
        for lev in range(len(series.levels)):
            try:
                arr = zarr.open_array(series.aszarr(level=lev), mode="r")
            except Exception:  # noqa: BLE001 - fall back to a full decode of this level
                arr = series.levels[lev].asarray()
            self._levels.append(arr)
        self.mpp = _tiff_mpp(tif)

    def _check_channels(self, channels: int) -> None:
        if channels not in (1, 2, 3, 4):
            raise InputError(
                f"{self.path}: image has {channels} channels; nucli reads gray, RGB or RGBA images "
                "(export one to three channels first)"
            )
        self.channels = channels

    def _yx_shape(self, arr) -> tuple[int, int]:
        shape = arr.shape
        if self._tif is None:
            return int(shape[0]), int(shape[1])
        return int(shape[self._axes.index("Y")]), int(shape[self._axes.index("X")])

    # -- reading raw blocks as (h, w, C)
    def _raw(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        arr = self._levels[level]
        if self._tif is None:
            block = np.asarray(arr[y : y + h, x : x + w])
            return block if block.ndim == 3 else block[..., None]
        idx = []
        for a, n in zip(self._axes, arr.shape):
            if a == "Y":
                idx.append(slice(y, y + h))
            elif a == "X":
                idx.append(slice(x, x + w))
            elif n > 1:
                idx.append(slice(None))
            else:
                idx.append(0)
        block = np.asarray(arr[tuple(idx)])
        if block.ndim == 2:
            return block[..., None]
        if self._channel_axis_first:
            block = np.moveaxis(block, 0, -1)
        return block

    def _sample(self) -> np.ndarray:
        """Pixels for the intensity scale: the smallest level when small enough, else windows."""
        level = len(self._levels) - 1
        w, h = self.level_dimensions[level]
        if w * h <= 2048 * 2048:
            return self._raw(level, 0, 0, w, h)
        win = 128
        xs = np.linspace(0, max(w - win, 0), 8).astype(int)
        ys = np.linspace(0, max(h - win, 0), 8).astype(int)
        return np.concatenate([self._raw(level, x, y, min(win, w), min(win, h)).reshape(-1, self.channels)
                               for y in ys for x in xs])

    def _intensity_scale(self) -> tuple[float, float] | None:
        arr = self._levels[0]
        dtype = np.dtype(arr.dtype)
        if dtype == np.uint8 or dtype == np.bool_:
            return None
        sample = self._sample().reshape(-1, self.channels)
        color = sample[:, : 3 if self.channels >= 3 else 1].astype(np.float64)
        lo, hi = np.percentile(color, [0.5, 99.5])
        if not hi > lo:
            hi = lo + 1.0
        log.info("%s: %s image scaled to 8 bits: %.4g -> 0, %.4g -> 255", self.path, dtype, lo, hi)
        return float(lo), float(hi)

    def read_level(self, level, x, y, w, h, background):
        block = self._raw(level, x, y, w, h)
        dtype = block.dtype
        c = block.shape[2]
        alpha = None
        if c in (2, 4):
            alpha = block[..., -1]
            block = block[..., :-1]
            if np.issubdtype(dtype, np.integer):
                alpha = alpha.astype(np.float32) / float(np.iinfo(dtype).max)
            else:
                alpha = np.clip(alpha.astype(np.float32), 0, 1)
        if dtype == np.bool_:
            rgb = block.astype(np.uint8) * 255
        elif self._scale is None:
            rgb = block.astype(np.uint8, copy=False)
        else:
            lo, hi = self._scale
            rgb = np.clip(np.round((block.astype(np.float32) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
        if rgb.shape[2] == 1:
            rgb = np.repeat(rgb, 3, axis=2)
        if alpha is not None:
            rgba = np.concatenate([rgb.astype(np.float32), (alpha * 255.0)[..., None]], axis=2)
            return _composite(rgba, background)
        return np.ascontiguousarray(rgb)

    def close(self):
        if self._tif is not None:
            self._tif.close()


def _tiff_mpp(tif) -> float | None:
    """Pixel size from a plain TIFF: OME PhysicalSizeX, ImageJ unit, or resolution tags."""
    try:
        if tif.is_ome and tif.ome_metadata:
            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            if m:
                factor = {"nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm", 1.0)
                return _plausible(float(m.group(1)) * factor)
        page = tif.pages[0]
        tags = page.tags
        xres = tags.get("XResolution")
        if xres is None:
            return None
        num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
        px_per_unit = float(num) / float(den or 1)
        if px_per_unit <= 0:
            return None
        if tif.is_imagej:
            unit = (tif.imagej_metadata or {}).get("unit", "")
            if unit in ("micron", "um", "µm", "\\u00B5m"):
                return _plausible(1.0 / px_per_unit)
            return None
        runit = tags.get("ResolutionUnit")
        runit = int(runit.value) if runit is not None else 2
        if runit == 3:  # centimetre
            return _plausible(1e4 / px_per_unit)
        if runit == 2:  # inch
            return _plausible(25400.0 / px_per_unit)
    except Exception:  # noqa: BLE001 - metadata is optional; never fail on it
        log.debug("could not parse TIFF resolution", exc_info=True)
    return None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


class _QuietTifffile(logging.Filter):
    """Hold back tifffile's own log records while probing a possibly broken file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False

    def __enter__(self):
        logging.getLogger("tifffile").addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("tifffile").removeFilter(self)


def _check_tiff_complete(path: Path) -> str | None:
    """For TIFF-based files: None if every image's data lies inside the file, else why not."""
    import tifffile

    size = path.stat().st_size
    try:
        with _QuietTifffile(), tifffile.TiffFile(str(path)) as tif:
            if not tif.pages:
                return "no images in the file"
            for page in tif.pages:
                offs = getattr(page, "dataoffsets", ()) or ()
                counts = getattr(page, "databytecounts", ()) or ()
                end = max((o + c for o, c in zip(offs, counts) if c), default=0)
                if end > size:
                    return f"image data ends at byte {end} but the file has {size} bytes"
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for broken files
        return _short(exc)
    return None


def _needs_conversion(path: Path) -> bool:
    """True for TIFFs that are not 8-bit RGB(A): read them with the plain-image backend."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            page = tif.pages[0]
            if any(getattr(tif, f"is_{k}", False) for k in ("svs", "ndpi", "scn", "bif", "philips")):
                return False
            return not (np.dtype(page.dtype) == np.uint8 and page.samplesperpixel in (3, 4))
    except Exception:  # noqa: BLE001
        return False


# ---------------------------------------------------------------------- associated images
class _Associated(Mapping):
    """Associated images (label, macro, thumbnail), decoded on first access."""

    def __init__(self, backend: _Backend):
        self._backend = backend
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name not in self._backend.associated_names():
                raise KeyError(name)
            self._cache[name] = self._backend.associated(name)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._backend.associated_names())

    def __len__(self) -> int:
        return len(self._backend.associated_names())


# ---------------------------------------------------------------------- the slide
class Slide:
    """An open slide or image. Use :func:`open_slide`; close it (or use ``with``)."""

    def __init__(self, path: Path, backend: _Backend, mpp: float | None = None):
        self.path = path
        self._b = backend
        self.metadata_mpp = backend.mpp
        self.mpp = float(mpp) if mpp is not None else backend.mpp

    # -- description
    @property
    def backend(self) -> str:
        return self._b.name

    @property
    def vendor(self) -> str | None:
        return self._b.vendor

    @property
    def properties(self) -> dict[str, Any]:
        return dict(self._b.properties)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._b.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._b.level_dimensions)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return list(self._b.level_dimensions)

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._b.level_downsamples)

    @cached_property
    def associated_images(self) -> Mapping[str, np.ndarray]:
        return _Associated(self._b)

    @cached_property
    def fingerprint(self) -> str:
        """File size + SHA-256 of its first and last 64 KiB (survives copying; not mtime)."""
        return _fingerprint(self.path)

    @cached_property
    def dark_background(self) -> bool:
        """True for dark-field images (fluorescence): the border of the image is dark."""
        if self._b.background_hint is not None:
            return float(np.mean(self._b.background_hint)) < 80
        border = self._lowres_for_background().reshape(-1, 3)
        return float(np.median(border.mean(axis=1))) < 80

    @cached_property
    def background(self) -> tuple[int, int, int]:
        """Colour used for padding and under transparent pixels: the slide's stated
        background colour, else black for dark-field images, else white."""
        if self._b.background_hint is not None:
            return self._b.background_hint
        return (0, 0, 0) if self.dark_background else (255, 255, 255)

    def _lowres_for_background(self) -> np.ndarray:
        """Pixels along the border of the coarsest level: 4 x 16 windows of <= 16 x 16 px."""
        level = self.level_count - 1
        lw, lh = self._b.level_dimensions[level]
        k = max(1, min(16, lw // 20 or 1, lh // 20 or 1))
        blocks = []
        for t in np.linspace(0.0, 1.0, 16):
            for x, y in ((t * (lw - k), 0), (t * (lw - k), lh - k), (0, t * (lh - k)), (lw - k, t * (lh - k))):
                blocks.append(self._read_level_padded(level, int(x), int(y), k, k, (255, 255, 255)).reshape(-1, 3))
        return np.concatenate(blocks)[None]

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, backend={self.backend}, vendor={self.vendor}, "
                f"size={self.dimensions}, levels={self.level_count}, mpp={self.mpp})")

    # -- context manager
    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._b.close()

    # -- pixel size
    def resolve_working_mpp(self, target_mpp: float | None) -> float | None:
        """The working pixel size for a requested one: the target, snapped so that the
        downsample is a whole number when it is within :data:`SNAP_TOLERANCE` of one.
        ``None`` (no target, or no pixel size known) means native resolution."""
        if target_mpp is None or self.mpp is None:
            return None
        if not (target_mpp > 0 and math.isfinite(target_mpp)):
            raise UsageError(f"--mpp-target must be a positive number, got {target_mpp}")
        d = target_mpp / self.mpp
        n = round(d)
        if n >= 1 and abs(d - n) <= SNAP_TOLERANCE * n:
            return self.mpp * n
        return float(target_mpp)

    def downsample_for(self, working_mpp: float | None) -> float:
        """Level-0 px per working px (1.0 for ``None``: native resolution)."""
        if working_mpp is None:
            return 1.0
        if self.mpp is None:
            raise InputError(f"{self.path} has no pixel size in its metadata; pass --mpp")
        d = float(working_mpp) / self.mpp
        n = round(d)
        if n >= 1 and abs(d - n) <= 1e-6 * n:
            return float(n)
        return d

    def working_size(self, working_mpp: float | None) -> tuple[int, int]:
        """(W, H) of the slide at the working pixel size (whole working px only)."""
        d = self.downsample_for(working_mpp)
        w0, h0 = self.dimensions
        return max(1, int(math.floor(w0 / d + 1e-6))), max(1, int(math.floor(h0 / d + 1e-6)))

    # -- reading
    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample``."""
        best = 0
        for i, d in enumerate(self._b.level_downsamples):
            if d <= downsample * (1 + LEVEL_TOLERANCE) and d >= self._b.level_downsamples[best]:
                best = i
        return best

    def _read_level_padded(self, level: int, x: int, y: int, w: int, h: int, background) -> np.ndarray:
        """Region of ``level`` (that level's px); outside the level is ``background``."""
        lw, lh = self._b.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x0 >= x1 or y0 >= y1:
            out = np.empty((h, w, 3), dtype=np.uint8)
            out[:] = background
            return out
        try:
            block = self._b.read_level(level, x0, y0, x1 - x0, y1 - y0, background)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - backends raise many types on damaged files
            raise InputError(
                f"{self.path}: cannot read pixels at level {level} ({x0}, {y0}) ({type(exc).__name__}: "
                f"{_short(exc)}); the file may be damaged or truncated"
            ) from None
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return block
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[:] = background
        out[y0 - y : y1 - y, x0 - x : x1 - x] = block
        return out

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """(h, w, 3) uint8 RGB like OpenSlide: ``x, y`` in level-0 px, ``w, h`` in ``level`` px."""
        if not 0 <= level < self.level_count:
            raise UsageError(f"level must be in [0, {self.level_count - 1}], got {level}")
        d = self._b.level_downsamples[level]
        lx, ly = int(round(x / d)), int(round(y / d))
        return self._read_level_padded(level, lx, ly, int(w), int(h), self.background)

    def read_working(self, x: int, y: int, w: int, h: int, working_mpp: float | None) -> np.ndarray:
        """(h, w, 3) uint8 RGB; ``x, y, w, h`` in working px (see module docstring)."""
        return self.read_scaled(x, y, w, h, self.downsample_for(working_mpp))

    def read_scaled(self, x: int, y: int, w: int, h: int, downsample: float) -> np.ndarray:
        """Like :meth:`read_working` with the downsample (level-0 px per output px) given."""
        return self._read_scaled(int(x), int(y), int(w), int(h), float(downsample), self.background)

    def _read_scaled(self, x, y, w, h, downsample, background) -> np.ndarray:
        if w <= 0 or h <= 0:
            return np.zeros((max(h, 0), max(w, 0), 3), dtype=np.uint8)
        level = self.best_level(downsample)
        r = downsample / self._b.level_downsamples[level]
        # split big requests (identical result: every output pixel depends only on its position)
        span = max(r, 1.0)
        if (w * span + 16) * (h * span + 16) > MAX_READ_PIXELS and (w > 1 or h > 1):
            bw = max(1, int(math.sqrt(MAX_READ_PIXELS) / span) - 16)
            out = np.empty((h, w, 3), dtype=np.uint8)
            for by in range(0, h, bw):
                for bx in range(0, w, bw):
                    ww, hh = min(bw, w - bx), min(bw, h - by)
                    out[by : by + hh, bx : bx + ww] = self._read_scaled(x + bx, y + by, ww, hh, downsample, background)
            return out
        if abs(r - 1.0) <= LEVEL_TOLERANCE:
            return self._read_level_padded(level, int(round(x * r)), int(round(y * r)), w, h, background)
        n = round(r)
        if n >= 2 and abs(r - n) <= LEVEL_TOLERANCE:
            src = self._read_level_padded(level, int(round(x * r)), int(round(y * r)), w * n, h * n, background)
            return _block_mean(src, n)
        return self._resample(level, x, y, w, h, r, background)

    def _resample(self, level, x, y, w, h, r, background) -> np.ndarray:
        from scipy import ndimage

        # Large factors: first a block mean by k = floor(r) on a grid aligned to
        # multiples of k (so the result does not depend on the window), then the
        # remaining factor r / k in [1, 2) by filter + bilinear sampling.
        k = int(math.floor(r)) if r >= 2 else 1
        rr = r / k
        sigma = max(0.0, (rr - 1.0) / 2.0)
        margin = int(math.ceil(4.0 * sigma)) + 2
        cx = (x + np.arange(w) + 0.5) * rr - 0.5  # output px centres, in reduced-grid index space
        cy = (y + np.arange(h) + 0.5) * rr - 0.5
        wx0 = int(math.floor(cx[0])) - margin
        wy0 = int(math.floor(cy[0])) - margin
        wx1 = int(math.floor(cx[-1])) + margin + 2
        wy1 = int(math.floor(cy[-1])) + margin + 2
        src = self._read_level_padded(level, wx0 * k, wy0 * k, (wx1 - wx0) * k, (wy1 - wy0) * k, background)
        if k > 1:
            src = _block_mean_f32(src, k)
        else:
            src = src.astype(np.float32)
        if sigma > 0:
            src = ndimage.gaussian_filter(src, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)
        x0i, x1i, fx = _linear_axis(cx - wx0, src.shape[1])
        y0i, y1i, fy = _linear_axis(cy - wy0, src.shape[0])
        rows = src[y0i] * (1 - fy)[:, None, None] + src[y1i] * fy[:, None, None]
        out = rows[:, x0i] * (1 - fx)[None, :, None] + rows[:, x1i] * fx[None, :, None]
        return np.clip(np.round(out), 0, 255).astype(np.uint8)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide, longest side ``max_size`` px (never upsampled)."""
        w0, h0 = self.dimensions
        d = max(1.0, max(w0, h0) / float(max_size))
        w, h = max(1, int(math.floor(w0 / d + 1e-6))), max(1, int(math.floor(h0 / d + 1e-6)))
        return self.read_scaled(0, 0, w, h, d)

    def verify(self) -> None:
        """Read a small patch of every level (catches damaged files early)."""
        for level, (lw, lh) in enumerate(self._b.level_dimensions):
            self._read_level_padded(level, 0, 0, min(lw, 64), min(lh, 64), (255, 255, 255))
            self._read_level_padded(level, max(lw - 64, 0), max(lh - 64, 0), min(lw, 64), min(lh, 64),
                                    (255, 255, 255))


# ---------------------------------------------------------------------- opening
def _check_path(path: Path) -> None:
    if not path.exists():
        raise InputError(f"slide not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory; pass a slide or image file")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise InputError(f"{path} is empty (0 bytes)")


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a whole-slide image or a plain image (see module docstring).

    ``mpp`` overrides the pixel size in the metadata. Raises :class:`InputError`
    (one line, naming the file) for anything that cannot be read.
    """
    path = Path(path).expanduser()
    if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise UsageError(f"--mpp must be a positive number of µm per pixel, got {mpp}")
    _check_path(path)
    kind = _sniff(path)
    why: list[str] = []
    backend: _Backend | None = None

    if kind == "tiff":
        problem = _check_tiff_complete(path)
        if problem is not None:
            raise InputError(f"{path} is a damaged or truncated TIFF/slide file ({problem})")
    convert = kind == "tiff" and _needs_conversion(path)

    if not convert:
        backend = _try_openslide(path, why)
    if backend is None and kind == "tiff" and not convert:
        backend = _try(lambda: _TiffSlideBackend(path), "tiffslide", why)
    if backend is None and kind is not None:
        try:
            backend = _ImageBackend(path, kind)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001
            why.append(f"image: {_short(exc)}")
    if backend is None:
        if kind is None and not why:
            raise InputError(
                f"{path} is not a slide or image nucli can read (unrecognised format; "
                "expected a whole-slide file OpenSlide reads, or TIFF/PNG/JPEG)"
            )
        raise InputError(f"cannot read {path}: {'; '.join(why) or 'unrecognised format'}")
    if not backend.level_dimensions or min(backend.level_dimensions[0]) < 1:
        backend.close()
        raise InputError(f"{path} holds no image pixels")
    slide = Slide(path, backend, mpp)
    try:
        slide.verify()
    except InputError:
        slide.close()
        raise
    if mpp is not None and backend.mpp is not None and abs(mpp - backend.mpp) > 0.01 * backend.mpp:
        log.info("%s: using --mpp %.4g instead of %.4g from the metadata", path, mpp, backend.mpp)
    log.debug("opened %r", slide)
    return slide


def _try(factory: Callable[[], _Backend], name: str, why: list[str]) -> _Backend | None:
    try:
        return factory()
    except Exception as exc:  # noqa: BLE001
        why.append(f"{name}: {_short(exc)}")
        return None


def _try_openslide(path: Path, why: list[str]) -> _Backend | None:
    try:
        import openslide
    except Exception as exc:  # noqa: BLE001 - the library may be missing its binary
        why.append(f"openslide unavailable: {_short(exc)}")
        return None
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001
        fmt = None
    if not fmt:
        return None
    return _try(lambda: _OpenSlideBackend(path), "openslide", why)


__all__ = ["Slide", "open_slide", "SNAP_TOLERANCE"]
