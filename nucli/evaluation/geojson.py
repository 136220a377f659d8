"""GeoJSON nuclei -> a label image on a given pixel grid.

Accepted (``.geojson``/``.json``, optionally gzipped as ``.gz``): a FeatureCollection, a bare JSON array of Features, a single Feature
or a bare Polygon/MultiPolygon geometry. Each feature becomes one object
(ids 1..n in file order; where features overlap the later one wins). Polygon
holes are cut out; the parts of a MultiPolygon form one object. A feature with a
QuPath ``nucleusGeometry`` (a cell object) is scored by that nucleus outline.

Coordinates are level-0 pixels with the origin at the top-left corner of the
top-left pixel (QuPath's convention): pixel ``(row, col)`` is inside an outline
when its centre ``(col + 0.5, row + 0.5)`` is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from nucli.errors import InputError

Ring = np.ndarray  # (K, 2) float x, y
PolygonRings = list[Ring]  # exterior first, then holes

MAX_COORD = float(2**31)
"""Coordinates beyond ± this (px) are refused: no slide is that large."""
MAX_RASTER_PIXELS = 2**30
"""Largest grid rasterised from GeoJSON alone (4 GiB of int32 labels)."""


def load_features(path: Path) -> list[list[PolygonRings]]:
    """Parse a GeoJSON file into one list of polygons per feature (validated)."""
    try:
        if str(path).lower().endswith(".gz"):
            import gzip

            with gzip.open(path, "rt", encoding="utf-8") as fh:
                data = json.load(fh)
        else:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (UnicodeDecodeError, EOFError):
        raise InputError(f"{path}: not a UTF-8 text file; expected GeoJSON") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be GeoJSON") from None
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise InputError(f"{path}: cannot read ({exc})") from None
    return parse_features(data, path)


def parse_features(data: Any, path: Path | str = "GeoJSON") -> list[list[PolygonRings]]:
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise InputError(f"{path}: FeatureCollection has no 'features' list")
    elif isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and data.get("type") in ("Polygon", "MultiPolygon"):
        features = [{"type": "Feature", "geometry": data}]
    else:
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise InputError(
            f"{path}: expected a GeoJSON FeatureCollection or an array of Features, got {kind!r}"
        )
    out = []
    for i, feat in enumerate(features):
        if not isinstance(feat, dict) or feat.get("type") != "Feature":
            raise InputError(f"{path}: item {i} is not a GeoJSON Feature")
        geom = feat.get("nucleusGeometry") or feat.get("geometry")
        if not isinstance(geom, dict):
            raise InputError(f"{path}: feature {i} has no geometry")
        out.append(_polygons(geom, path, i))
    return out


def _polygons(geom: dict, path: Path | str, i: int) -> list[PolygonRings]:
    gtype = geom.get("type")
    coords = geom.get("coordinates")
    if gtype == "Polygon":
        polys = [coords]
    elif gtype == "MultiPolygon":
        if not isinstance(coords, list):
            raise InputError(f"{path}: feature {i}: MultiPolygon coordinates must be a list of polygons")
        polys = coords
    else:
        raise InputError(
            f"{path}: feature {i} has geometry type {gtype!r}; only Polygon and MultiPolygon outlines can be scored"
        )
    result = []
    for poly in polys:
        if not isinstance(poly, list) or not poly:
            raise InputError(f"{path}: feature {i}: a polygon must be a non-empty list of rings")
        rings = []
        for ring in poly:
            try:
                arr = np.asarray(ring, dtype=np.float64)
            except (TypeError, ValueError):
                raise InputError(f"{path}: feature {i}: ring coordinates are not [x, y] number pairs") from None
            if arr.ndim != 2 or arr.shape[1] < 2 or len(arr) < 3:
                raise InputError(f"{path}: feature {i}: a ring needs at least 3 [x, y] positions")
            if not np.isfinite(arr[:, :2]).all():
                raise InputError(f"{path}: feature {i}: ring coordinates must be finite numbers")
            if np.abs(arr[:, :2]).max() > MAX_COORD:
                raise InputError(f"{path}: feature {i}: coordinates beyond ±{MAX_COORD:.0f} px (no slide is that "
                                 "large)")
            rings.append(arr[:, :2])
        result.append(rings)
    return result


def bounds_shape(features: list[list[PolygonRings]], path: Path | str = "GeoJSON") -> tuple[int, int]:
    """Smallest (rows, cols) grid holding every outline (at most :data:`MAX_RASTER_PIXELS`)."""
    xmax = ymax = 0.0
    for polys in features:
        for rings in polys:
            xmax = max(xmax, float(rings[0][:, 0].max()))
            ymax = max(ymax, float(rings[0][:, 1].max()))
    rows, cols = int(math.ceil(ymax)), int(math.ceil(xmax))
    if rows * cols > MAX_RASTER_PIXELS:
        raise InputError(f"{path}: outlines reach x={xmax:.0f}, y={ymax:.0f}; a {cols} x {rows} px grid is too "
                         "large to rasterise for scoring (give the ground truth as a label image, or crop)")
    return rows, cols


def rasterize(features: list[list[PolygonRings]], shape: tuple[int, int]) -> np.ndarray:
    """Label image of ``shape`` with feature ``k`` drawn as id ``k + 1``.

    Outlines (partly) outside the grid are clipped to it.
    """
    from skimage.draw import polygon as fill

    h, w = int(shape[0]), int(shape[1])
    dtype = np.int32 if len(features) < 2**31 - 1 else np.int64
    labels = np.zeros((h, w), dtype=dtype)
    for k, polys in enumerate(features, start=1):
        if not polys:  # an empty MultiPolygon: an object without pixels
            continue
        ext = np.concatenate([rings[0] for rings in polys])
        c0 = max(int(math.floor(ext[:, 0].min())) - 1, 0)
        r0 = max(int(math.floor(ext[:, 1].min())) - 1, 0)
        c1 = min(int(math.ceil(ext[:, 0].max())) + 1, w)
        r1 = min(int(math.ceil(ext[:, 1].max())) + 1, h)
        if c1 <= c0 or r1 <= r0:
            continue
        box = (r1 - r0, c1 - c0)
        mask = np.zeros(box, dtype=bool)
        for rings in polys:
            part = np.zeros(box, dtype=bool)
            rr, cc = fill(rings[0][:, 1] - 0.5 - r0, rings[0][:, 0] - 0.5 - c0, box)
            part[rr, cc] = True
            for hole in rings[1:]:
                rr, cc = fill(hole[:, 1] - 0.5 - r0, hole[:, 0] - 0.5 - c0, box)
                part[rr, cc] = False
            mask |= part
        labels[r0:r1, c0:c1][mask] = k
    return labels
