"""Slide readers behind :mod:`nucli.slide`: OpenSlide, tiffslide and plain images.

Each backend reports its levels, pixel size, vendor and associated images, and
reads an in-bounds region of one level as ``(h, w, 3)`` uint8 RGB. Conversions
(gray -> RGB, alpha compositing, 16-bit scaling) happen here; choosing a level
and resampling happen in :class:`nucli.slide.Slide`.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nucli.errors import InputError

log = logging.getLogger("nucli.slide")

PLAUSIBLE_MPP = (0.01, 25.0)
"""Pixel sizes (µm/px) outside this range in a plain image's tags are ignored (e.g. 72 dpi)."""
PHOTOMETRIC_SEPARATED = 5
"""TIFF photometric interpretation of CMYK images (converted to RGB on reading)."""


# ---------------------------------------------------------------------- helpers
def _composite(rgba: np.ndarray, background: tuple[int, int, int], alpha_max: float = 255.0) -> np.ndarray:
    """RGB(A) array -> uint8 RGB, alpha composited on ``background``."""
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if np.all(alpha >= alpha_max):
        return np.ascontiguousarray(rgb, dtype=np.uint8)
    a = (alpha.astype(np.float32) / alpha_max)[..., None]
    bg = np.asarray(background, dtype=np.float32)
    out = rgb.astype(np.float32) * a + bg * (1.0 - a)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


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


_WARNED: set[tuple] = set()
"""Warnings already given in this process (a slide opened again, e.g. for the overlay, says each once)."""


def warn_once(key: tuple, message: str, *args: Any) -> None:
    """``log.warning(message, *args)`` unless a warning of this ``key`` was given already."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    log.warning(message, *args)


def _file_key(path: Path) -> tuple:
    try:
        st = Path(path).stat()
        return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(path),)


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    return float(mpp) if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


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
        self._cmyk = False
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
        if arr.ndim == 3 and arr.shape[2] == 4 and _pil_mode(path) == "CMYK":
            from PIL import Image

            with Image.open(path) as im:  # Pillow knows the JPEG's ink conventions (Adobe inverted CMYK)
                arr = np.asarray(im.convert("RGB"))
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
        if tif.pages[0].photometric == PHOTOMETRIC_SEPARATED:
            if channels != 4 or np.dtype(series.dtype) != np.uint8:
                raise InputError(f"{path}: {channels}-ink {series.dtype} CMYK image; nucli reads 8-bit CMYK "
                                 "(convert it to RGB first)")
            self._cmyk = True
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
        finite = np.isfinite(color)
        if not finite.all():
            self._warn_not_numbers()
            color = color[finite]
        lo, hi = np.percentile(color, [0.5, 99.5]) if color.size else (0.0, 1.0)
        if not hi > lo:
            hi = lo + 1.0
        log.info("%s: %s image scaled to 8 bits: %.4g -> 0, %.4g -> 255", self.path, dtype, lo, hi)
        return float(lo), float(hi)

    def _warn_not_numbers(self) -> None:
        warn_once(("not-numbers", *_file_key(self.path)),
                  "%s holds pixels that are not numbers (NaN or infinite); nucli treats them as background "
                  "and scales the intensities of the others", self.path)

    def read_level(self, level, x, y, w, h, background):
        block = self._raw(level, x, y, w, h)
        missing = None  # pixels that are NaN or infinite (float images): painted as background
        if np.issubdtype(block.dtype, np.floating):
            finite = np.isfinite(block)
            if not finite.all():
                self._warn_not_numbers()
                missing = ~finite.all(axis=2)
                block = np.where(finite, block, 0 if self._scale is None else self._scale[0]).astype(block.dtype)
        if self._cmyk:  # as libtiff (and so OpenSlide) converts: (255 - C) * (255 - K) / 255
            ink = 255 - block.astype(np.uint16)
            return ((ink[..., :3] * ink[..., 3:4]) // 255).astype(np.uint8)
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
            rgb = _composite(rgba, background)
        rgb = np.ascontiguousarray(rgb)
        if missing is not None:
            rgb[missing] = background
        return rgb

    def close(self):
        if self._tif is not None:
            self._tif.close()


def _pil_mode(path: Path) -> str | None:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.mode
    except Exception:  # noqa: BLE001 - only a hint for 4-channel images
        return None


_OME_UNITS = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_size_x(tif) -> float | None:
    """``PhysicalSizeX`` of an OME-TIFF in µm (its unit converted), or None (not OME, none given, unparsable)."""
    if not (tif.is_ome and tif.ome_metadata):
        return None
    m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
    if not m:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
    factor = _OME_UNITS.get(unit.group(1) if unit else "µm")
    try:
        return float(m.group(1)) * factor if factor is not None else None
    except ValueError:
        return None


def ome_mpp(path: Path) -> float | None:
    """The OME ``PhysicalSizeX`` of a TIFF file, whatever reader opens it (OpenSlide and tiffslide do not
    read OME metadata), or None."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            return _ome_size_x(tif)
    except Exception:  # noqa: BLE001 - metadata is optional; never fail on it
        log.debug("could not read OME metadata", exc_info=True)
        return None


def _tiff_mpp(tif) -> float | None:
    """Pixel size from a plain TIFF: OME PhysicalSizeX, ImageJ unit, or resolution tags."""
    try:
        ome = _ome_size_x(tif)
        if ome is not None:
            return _plausible(ome)
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


def _chain_cut_at(tif, size: int) -> int | None:
    """Where the chain of image directories (IFDs) continues past the end of a file of ``size`` bytes (the
    byte the last readable directory points to), or None when the chain ends inside the file. A file cut
    short after its last whole directory loses the images after it without any error from the readers."""
    t = tif.tiff
    last = tif.pages[-1]
    fh = tif.filehandle
    fh.seek(last.offset)
    tagno = struct.unpack(t.tagnoformat, fh.read(t.tagnosize))[0]
    at = last.offset + t.tagnosize + tagno * t.tagsize
    if at + t.offsetsize > size:
        return at
    fh.seek(at)
    nxt = int(struct.unpack(t.offsetformat, fh.read(t.offsetsize))[0])
    if nxt == 0:
        return None
    if nxt + t.tagnosize > size:
        return nxt
    fh.seek(nxt)
    tagno = struct.unpack(t.tagnoformat, fh.read(t.tagnosize))[0]
    end = nxt + t.tagnosize + tagno * t.tagsize + t.offsetsize
    return nxt if tagno <= 4096 and end > size else None


def _check_tiff_complete(path: Path) -> tuple[str | None, str | None]:
    """For TIFF-based files: ``(problem, cut)``. ``problem``: why the images' data does not lie inside the
    file (None when it does); ``cut``: a warning when the file ends where its list of images goes on (the
    images after the last whole one, e.g. the label or macro picture, are missing), else None."""
    import tifffile

    size = path.stat().st_size
    cut = None
    try:
        with _QuietTifffile(), tifffile.TiffFile(str(path)) as tif:
            if not tif.pages:
                return "no images in the file", None
            for page in tif.pages:
                offs = getattr(page, "dataoffsets", ()) or ()
                counts = getattr(page, "databytecounts", ()) or ()
                end = max((o + c for o, c in zip(offs, counts) if c), default=0)
                if end > size:
                    return f"image data ends at byte {end} but the file has {size} bytes", None
                if getattr(page, "is_tiled", False) and offs:
                    needed = math.prod(getattr(page, "chunked", ()) or (len(offs),))
                    if len(offs) < needed:
                        return (f"its header gives {page.imagewidth} x {page.imagelength} px, which needs {needed} "
                                f"tiles, but the file holds {len(offs)}"), None
            try:
                at = _chain_cut_at(tif, size)
            except (struct.error, OSError, ValueError):
                at = None
            if at is not None:
                n = len(tif.pages)
                cut = (f"{path} looks cut short: its list of images goes on at byte {at:,} but the file ends at byte "
                       f"{size:,}, so the images after the first {n} (a label or macro picture, reduced levels) are "
                       f"missing; nucli reads the {n} that are whole (copy the file again if it should hold more)")
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for broken files
        return _short(exc), None
    return None, cut


def _needs_conversion(path: Path) -> bool:
    """True for TIFFs that are not 8-bit RGB(A) (gray, 16-bit, CMYK, ...): read them with the plain-image backend."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            page = tif.pages[0]
            if any(getattr(tif, f"is_{k}", False) for k in ("svs", "ndpi", "scn", "bif", "philips")):
                return False
            if page.photometric == PHOTOMETRIC_SEPARATED:
                return True
            return not (np.dtype(page.dtype) == np.uint8 and page.samplesperpixel in (3, 4))
    except Exception:  # noqa: BLE001
        return False
