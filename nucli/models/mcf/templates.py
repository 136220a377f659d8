"""Nucleus templates: the handful of examples MCF starts from.

A :class:`Template` is a square window of *prepared* pixels
(:func:`nucli.models.mcf.features.prepare`) centred on one nucleus, with the
nucleus diameter in pixels. The window spans ``CONTEXT`` nucleus diameters
plus a margin of ``MARGIN`` px on each side (room for the feature filters).

Three sources:

* :func:`from_crops` -- a folder of image files, each a tight crop around one
  nucleus (the nucleus fills the crop; diameter = mean of the crop's sides).
  The missing context is filled with the crop's border colour.
* :func:`from_geojson` -- points or outlines/boxes drawn on one image (QuPath
  convention: coordinates in pixels, origin at the top-left corner of the
  top-left pixel). An outline gives the centre and the diameter (mean of its
  bounding-box sides); a point takes its ``diameter`` property or
  ``default_diameter``.
* :func:`from_labels` -- ``n`` nuclei drawn at random (seeded) from a labelled
  set ``DIR/images`` + ``DIR/labels`` (for experiments); nuclei touching the
  image border or smaller than ``min_area`` px are not drawn.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nucli.errors import InputError, UsageError

log = logging.getLogger("nucli.mcf")

CONTEXT = 2.0  # window side in nucleus diameters
MARGIN = 8  # extra px on each side of the window
MIN_DIAMETER = 5.0
MAX_DIAMETER = 120.0
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


@dataclass
class Template:
    window: np.ndarray  # (3, L, L) float32 prepared pixels, nucleus at the centre, L odd
    diameter: float  # nucleus diameter in px
    source: str = ""

    @property
    def size(self) -> int:
        return int(self.window.shape[-1])


def window_side(diameter: float) -> int:
    """Odd side of the stored window for a nucleus of ``diameter`` px."""
    half = int(math.ceil(CONTEXT * diameter / 2.0)) + MARGIN
    return 2 * half + 1


def cut_window(prep: np.ndarray, cy: float, cx: float, diameter: float, fill: np.ndarray | None = None
               ) -> np.ndarray:
    """The template window of a prepared image around ``(cy, cx)`` (pixel indices).

    Outside the image the window is filled with ``fill`` (per channel) or, when
    ``fill`` is None, by reflection.
    """
    side = window_side(diameter)
    half = side // 2
    cy, cx = int(round(cy)), int(round(cx))
    _, h, w = prep.shape
    pad_needed = max(0, half - cy, half - cx, cy + half + 1 - h, cx + half + 1 - w)
    if pad_needed:
        if fill is None and min(h, w) > pad_needed:
            padded = np.pad(prep, ((0, 0), (pad_needed,) * 2, (pad_needed,) * 2), mode="reflect")
        else:
            padded = np.empty((3, h + 2 * pad_needed, w + 2 * pad_needed), np.float32)
            vals = fill if fill is not None else np.median(prep.reshape(3, -1), axis=1)
            padded[:] = np.asarray(vals, np.float32)[:, None, None]
            padded[:, pad_needed:pad_needed + h, pad_needed:pad_needed + w] = prep
        prep, cy, cx = padded, cy + pad_needed, cx + pad_needed
    return np.ascontiguousarray(prep[:, cy - half: cy + half + 1, cx - half: cx + half + 1], dtype=np.float32)


def _check_diameter(d: float, where: str) -> float:
    if not (MIN_DIAMETER <= d <= MAX_DIAMETER):
        raise InputError(f"{where}: nucleus diameter {d:.1f} px is outside {MIN_DIAMETER:g}-{MAX_DIAMETER:g} px; "
                         "give tighter/larger templates or resample the image")
    return float(d)


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            img = np.asarray(tifffile.imread(path))
        else:
            img = np.asarray(Image.open(path))
    except Exception as exc:  # noqa: BLE001 - any decoder error is an input problem
        raise InputError(f"cannot read image {path}: {' '.join(str(exc).split())[:120]}") from None
    if img.ndim == 3 and img.shape[-1] in (2, 4):
        img = img[..., : 1 if img.shape[-1] == 2 else 3]
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
        raise InputError(f"{path}: expected a grey or RGB image, got shape {tuple(img.shape)}")
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.integer):
            img = (img.astype(np.float64) * 255.0 / max(float(img.max()), 1.0)).round().astype(np.uint8)
        else:
            img = (np.clip(img.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    return img


# ---------------------------------------------------------------- sources
def from_crops(folder: Path) -> list[Template]:
    """One template per image file in ``folder`` (tight crops around one nucleus each)."""
    from nucli.models.mcf.features import prepare_crop

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"template folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise InputError(f"{folder}: no template images (.png, .tif, .jpg) found")
    out = []
    for p in files:
        img = _read_image(p)
        h, w = img.shape[:2]
        if min(h, w) < 4:
            raise InputError(f"{p}: template crop is {h}x{w} px; crops must be at least 4 px on each side")
        prep = prepare_crop(img)
        border = np.concatenate([prep[:, 0], prep[:, -1], prep[:, :, 0], prep[:, :, -1]], axis=1)
        d = _check_diameter((h + w) / 2.0, str(p))
        out.append(Template(cut_window(prep, (h - 1) / 2.0, (w - 1) / 2.0, d, fill=np.median(border, axis=1)),
                            d, f"crop:{p.name}"))
    return out


def _geojson_objects(data: object, path: Path) -> list[tuple[str, list, dict]]:
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features") or []
    elif isinstance(data, list):
        feats = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    elif isinstance(data, dict) and "coordinates" in data:
        feats = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise InputError(f"{path}: expected a GeoJSON FeatureCollection of points or outlines")
    out = []
    for f in feats:
        geom = (f or {}).get("geometry") if isinstance(f, dict) else None
        if not isinstance(geom, dict):
            raise InputError(f"{path}: a feature has no geometry")
        props = f.get("properties") or {}
        kind, coords = geom.get("type"), geom.get("coordinates")
        if kind == "MultiPoint":
            out.extend(("Point", c, props) for c in coords or [])
        elif kind in ("Point", "Polygon", "MultiPolygon", "LineString"):
            out.append((kind, coords, props))
        else:
            raise InputError(f"{path}: geometry type {kind!r} is not a point, box or outline")
    if not out:
        raise InputError(f"{path}: no points or outlines found")
    return out


def from_geojson(image_path: Path, geojson_path: Path, default_diameter: float | None = None) -> list[Template]:
    """Templates at points / outlines of a GeoJSON drawn on ``image_path``."""
    from nucli.models.mcf.features import prepare

    image_path, geojson_path = Path(image_path), Path(geojson_path)
    if not geojson_path.is_file():
        raise InputError(f"template GeoJSON not found: {geojson_path}")
    if not image_path.is_file():
        raise InputError(f"template image not found: {image_path}")
    try:
        data = json.loads(geojson_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{geojson_path}: not valid GeoJSON ({str(exc)[:80]})") from None
    img = _read_image(image_path)
    prep = prepare(img)
    h, w = img.shape[:2]
    out = []
    for i, (kind, coords, props) in enumerate(_geojson_objects(data, geojson_path)):
        try:
            if kind == "Point":
                x, y = float(coords[0]), float(coords[1])
                d = props.get("diameter", default_diameter)
                if d is None:
                    raise UsageError(f"{geojson_path}: point {i} has no 'diameter' property; "
                                     "pass a default nucleus diameter (--template-diameter)")
                d = float(d)
            else:
                flat = np.asarray(_flatten(coords), np.float64).reshape(-1, 2)
                x0, y0 = flat.min(0)
                x1, y1 = flat.max(0)
                x, y = (x0 + x1) / 2.0, (y0 + y1) / 2.0
                d = ((x1 - x0) + (y1 - y0)) / 2.0
        except (TypeError, ValueError, IndexError):
            raise InputError(f"{geojson_path}: feature {i} has malformed coordinates") from None
        cx, cy = x - 0.5, y - 0.5
        if not (0 <= cx < w and 0 <= cy < h):
            raise InputError(f"{geojson_path}: feature {i} at ({x:.0f}, {y:.0f}) lies outside the "
                             f"{w}x{h} image {image_path.name}")
        d = _check_diameter(d, f"{geojson_path} feature {i}")
        out.append(Template(cut_window(prep, cy, cx, d), d, f"geojson:{geojson_path.name}#{i}"))
    return out


def _flatten(coords) -> list[float]:
    if isinstance(coords, (int, float)):
        return [float(coords)]
    out: list[float] = []
    for c in coords:
        out.extend(_flatten(c))
    return out


def from_labels(data_dir: Path, n: int = 10, seed: int = 0, min_area: int = 20) -> list[Template]:
    """``n`` nuclei drawn uniformly (seeded) from the labelled set in ``data_dir``."""
    from scipy import ndimage as ndi

    from nucli.models.mcf.features import prepare
    from nucli.training.data import list_pairs, read_pair

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    pairs = list_pairs(Path(data_dir))
    candidates: list[tuple[int, int]] = []  # (pair index, label id)
    for pi, (ip, lp) in enumerate(pairs):
        _, lab = read_pair(ip, lp)
        ids, areas = np.unique(lab, return_counts=True)
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        for lid, area in zip(ids, areas):
            if lid and area >= min_area and lid not in border:
                candidates.append((pi, int(lid)))
    if len(candidates) < n:
        raise InputError(f"{data_dir}: only {len(candidates)} usable nuclei, cannot draw {n}")
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(candidates), size=n, replace=False).tolist())
    out = []
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in picks:
        pi, lid = candidates[k]
        if pi not in cache:
            img, lab = read_pair(*pairs[pi])
            cache = {pi: (prepare(img), lab)}
        prep, lab = cache[pi]
        mask = lab == lid
        cy, cx = ndi.center_of_mass(mask)
        d = float(np.clip(2.0 * math.sqrt(mask.sum() / math.pi), MIN_DIAMETER, MAX_DIAMETER))
        out.append(Template(cut_window(prep, cy, cx, d), d, f"labels:{pairs[pi][0].stem}#{lid}"))
    log.info("drew %d templates from %d candidate nuclei in %s (seed %d)", n, len(candidates), data_dir, seed)
    return out
