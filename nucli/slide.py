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

The readers themselves live in :mod:`nucli.slide_backends`.

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
import stat
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from nucli.errors import InputError, UsageError
from nucli.slide_backends import (
    _Backend,
    _check_tiff_complete,
    _file_key,
    _ImageBackend,
    _needs_conversion,
    _OpenSlideBackend,
    _QuietTifffile,
    _short,
    _sniff,
    _TiffSlideBackend,
    ome_mpp,
    warn_once,
)

log = logging.getLogger("nucli.slide")

SNAP_TOLERANCE = 0.05
"""A target downsample within 5 % of a whole number is snapped to it (no resampling blur)."""
LEVEL_TOLERANCE = 1e-3
"""Relative slack when comparing a pyramid level's downsample with a target."""
MAX_READ_PIXELS = 2048 * 2048
"""Largest source window read at once; bigger requests are split (results are identical)."""
MAX_SIDE = 1 << 20
"""Largest slide width/height accepted (a 1,048,576 px side is > 100 mm at 0.1 µm/px): beyond, the header is damaged."""

_FINGERPRINT_BYTES = 64 * 1024
FINGERPRINT_SAMPLES = 64
"""Blocks of 64 KiB hashed, evenly spread from the first byte to the last (4 MiB of any file; smaller
files are hashed whole)."""
MIN_MPP, MAX_MPP = 0.01, 20.0
"""Pixel sizes (µm/px) a microscope image can have: finer is below any optics' resolution, coarser than
a 1x scan. Metadata outside is not a microscope pixel size (e.g. a 72 dpi TIFF tag, 352.8 µm/px) and is
ignored with a warning; options outside are usage errors."""
MAX_UPSAMPLE = 16.0
"""Most a slide is enlarged for the working pixel size; beyond, the pixel sizes are surely wrong."""


# ---------------------------------------------------------------------- pixel helpers
def _fingerprint(path: Path) -> str:
    """File size + SHA-256 of :data:`FINGERPRINT_SAMPLES` blocks spread over the whole file (``SIZE-s-HASH``).

    Two slides of one size that share their first and last bytes still differ in the blocks between;
    reading 4 MiB costs the same for a 100 MB and a 10 GB slide. Copies and renamed files agree.
    """
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= _FINGERPRINT_BYTES * FINGERPRINT_SAMPLES:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            last = size - _FINGERPRINT_BYTES
            for k in range(FINGERPRINT_SAMPLES):
                fh.seek(k * last // (FINGERPRINT_SAMPLES - 1))
                h.update(fh.read(_FINGERPRINT_BYTES))
    return f"{size}-s-{h.hexdigest()[:32]}"


def _legacy_fingerprint(path: Path) -> str:
    """The fingerprint of stores made before sampled blocks: size + first and last 64 KiB."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            fh.seek(max(size - _FINGERPRINT_BYTES, _FINGERPRINT_BYTES))
            h.update(fh.read(_FINGERPRINT_BYTES))
    return f"{size}-{h.hexdigest()[:32]}"


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
        meta_mpp = backend.mpp
        if meta_mpp is not None and not (MIN_MPP <= meta_mpp <= MAX_MPP):
            log.warning("%s: the metadata's pixel size %.4g µm/px is not a microscope pixel size (outside %g-%g; "
                        "e.g. a screen or print resolution); treating the image as having no pixel size "
                        "(pass --mpp to set it)", path, meta_mpp, MIN_MPP, MAX_MPP)
            meta_mpp = None
        self.metadata_mpp = meta_mpp
        self.mpp = float(mpp) if mpp is not None else meta_mpp

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
        """File size + SHA-256 of 64 blocks spread over the file (survives copying; not mtime)."""
        return _fingerprint(self.path)

    def has_fingerprint(self, fingerprint: str | None) -> bool:
        """True when ``fingerprint`` (as a run store recorded it) is this file's; stores made before
        sampled fingerprints recorded size + first and last 64 KiB, and are checked that way."""
        if not fingerprint:
            return False
        if "-s-" in fingerprint:
            return fingerprint == self.fingerprint
        return fingerprint == _legacy_fingerprint(self.path)

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
        if not MIN_MPP <= target_mpp <= MAX_MPP:
            raise UsageError(f"--mpp-target {target_mpp:g} µm/px is not a microscope pixel size; "
                             f"give one between {MIN_MPP:g} and {MAX_MPP:g}")
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
        if not (math.isfinite(d) and d >= 1.0 / MAX_UPSAMPLE):
            src = "--mpp" if self.mpp != self.metadata_mpp else "the slide's metadata"
            raise UsageError(f"{self.path.name}: working at {working_mpp:.4g} µm/px would enlarge the slide "
                             f"{1 / d:.3g}x (its pixel size {self.mpp:.4g} µm/px, from {src}); nucli enlarges "
                             f"at most {MAX_UPSAMPLE:g}x: check --mpp and --mpp-target")
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
        st = path.stat()
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block every read until someone writes into it
            raise InputError(f"{path} is not a regular file (a FIFO, socket or device); pass a slide or image file")
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
    if mpp is not None and not MIN_MPP <= mpp <= MAX_MPP:
        raise UsageError(f"--mpp {mpp:g} µm/px is not a microscope pixel size; give one between {MIN_MPP:g} and "
                         f"{MAX_MPP:g}")
    _check_path(path)
    kind = _sniff(path)
    why: list[str] = []
    backend: _Backend | None = None

    if kind == "tiff":
        problem, cut = _check_tiff_complete(path)
        if problem is not None:
            raise InputError(f"{path} is a damaged or truncated TIFF/slide file ({problem})")
        if cut is not None:
            warn_once(("cut", *_file_key(path)), "%s", cut)
    convert = kind == "tiff" and _needs_conversion(path)
    with _QuietTifffile():  # tifffile's warnings about a damaged file would add lines to nucli's one-line error
        backend = _open_backend(path, kind, convert, why)
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
    if kind == "tiff" and backend.mpp is None and not isinstance(backend, _ImageBackend):
        backend.mpp = ome_mpp(path)  # OpenSlide and tiffslide leave an OME-TIFF's PhysicalSizeX unread
    if max(backend.level_dimensions[0]) > MAX_SIDE:
        w, h = backend.level_dimensions[0]
        backend.close()
        raise InputError(f"{path}: its header gives {w} x {h} px, larger than any slide (nucli reads up to "
                         f"{MAX_SIDE:,} px a side); the file is damaged")
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


def _open_backend(path: Path, kind: str | None, convert: bool, why: list[str]) -> _Backend | None:
    """The first backend that opens ``path`` (reasons of the others appended to ``why``), or None."""
    backend = None
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
    return backend


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
