"""GeoJSON for QuPath: one Feature per nucleus (a detection) or per cell, written as a stream.

What QuPath's reader (``PathIO.readObjects``, *File > Import objects*) relies on,
and :func:`check_qupath_feature` tests:

* a ``FeatureCollection`` (or a bare array of Features);
* each Feature has a UUID ``id`` -- here a v5 UUID derived from the slide
  fingerprint, the tile and the nucleus' pixels, so the same input always gives
  byte-identical output;
* ``geometry`` a valid ``Polygon`` with closed rings (first point == last), in
  level-0 pixel coordinates with the origin at the slide's top-left, every vertex
  on QuPath's 0.01 px grid (QuPath rounds to it; nucli writes and measures the
  rounded polygon, so nothing moves on import). One invalid polygon makes QuPath
  refuse the whole file;
* ``properties.objectType``: ``"detection"`` for a nucleus, or ``"cell"`` for a
  cell, whose ``geometry`` is the cell boundary and ``properties.nucleusGeometry``
  the nucleus;
* ``properties.classification = {"name": ..., "color": [r, g, b]}`` -- a class
  without a colour makes QuPath reject the whole file
  (``JsonParseException: Unable to parse PathClass``), so every class has one;
* ``properties.measurements = {name: number}`` (finite numbers only), named as
  QuPath's own cell detection names them (``Nucleus: Area µm^2``, ...), never as
  the measurements QuPath derives from the outline itself.

Files ending in ``.gz`` are gzipped (no time stamp, so reproducible).
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

from nucli.stitching import Sink
from nucli.export._atomic import AtomicFile
from nucli.export.measurements import Column, columns_for, row_values
from nucli.export.qupath_grid import on_grid, ring_coords

CLASS_NAME = "Nucleus"
CLASS_COLOR = [0, 200, 0]
CELL_CLASS_NAME = "Cell"
MEASUREMENT_DECIMALS = 4
# measurements QuPath computes itself from a detection's outline (measurement table, Add shape features):
# a nucleus measurement with one of these names would be hidden or overwritten
QUPATH_OWN_NAMES = frozenset(
    f"{name} {unit}" for name in ("Centroid X", "Centroid Y", "Length", "Perimeter", "Max diameter", "Min diameter")
    for unit in ("px", "µm")
) | {"Area px^2", "Area µm^2", "Circularity", "Solidity"}


def class_of(nucleus: Any) -> dict[str, Any]:
    """The QuPath classification of a nucleus or cell: its positivity class, else Nucleus / Cell."""
    from nucli.export.positivity import CLASS_COLORS

    name = getattr(nucleus, "classification", None)
    if name:
        return {"name": name, "color": list(CLASS_COLORS[name])}
    if getattr(nucleus, "cell", None) is not None:
        return {"name": CELL_CLASS_NAME, "color": list(CLASS_COLOR)}
    return {"name": CLASS_NAME, "color": list(CLASS_COLOR)}


def polygon_json(poly: Any) -> dict[str, Any]:
    """A shapely Polygon as GeoJSON, vertices with 2 decimals (QuPath's grid)."""
    return {"type": "Polygon", "coordinates": [ring_coords(poly.exterior)] + [ring_coords(r) for r in poly.interiors]}


def feature(nucleus: Any, cols: list[Column], brightfield: bool) -> dict[str, Any]:
    """One nucleus as a QuPath detection Feature, or as a cell when it has one (``cols``: from :func:`columns_for`)."""
    values = row_values(nucleus, cols, brightfield)
    meas = {}
    for c in cols:
        v = values.get(c.key)
        if c.qupath is None or v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            meas[c.qupath] = round(v, MEASUREMENT_DECIMALS)
    cell = getattr(nucleus, "cell", None)
    props: dict[str, Any] = {"objectType": "cell" if cell is not None else "detection"}
    if cell is not None:
        props["nucleusGeometry"] = polygon_json(nucleus.polygon)
    props["classification"] = class_of(nucleus)
    props["measurements"] = meas
    return {
        "type": "Feature",
        "id": nucleus.uid,
        "geometry": polygon_json(cell if cell is not None else nucleus.polygon),
        "properties": props,
    }


class GeoJSONSink(Sink):
    """Streams a FeatureCollection to ``path`` (``.gz``: gzipped); atomic."""

    def __init__(self, path: Path, options: Any = None):
        self.path = Path(path)
        self.options = options
        self.gz = self.path.name.lower().endswith(".gz")
        self._file: AtomicFile | None = None
        self._cols: list[Column] = []
        self.count = 0

    def open(self, frame: Any) -> None:
        self.brightfield = frame.brightfield
        self._cols = columns_for(frame, self.options)
        self._file = AtomicFile(self.path, gz=self.gz)
        self._file.handle.write('{"type": "FeatureCollection", "features": [')

    def add(self, nucleus: Any) -> None:
        text = json.dumps(feature(nucleus, self._cols, self.brightfield), ensure_ascii=False,
                          separators=(",", ":"))
        self._file.handle.write(("\n" if self.count == 0 else ",\n") + text)
        self.count += 1

    def close(self) -> None:
        if self._file is None:
            return
        self._file.handle.write("\n]}\n")
        self._file.commit()

    def abort(self) -> None:
        if self._file is not None:
            self._file.discard()


# --------------------------------------------------------------------------- reading / checking


def load(path: Path) -> dict[str, Any]:
    """Read a (possibly gzipped) GeoJSON file."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def qupath_features(doc: Any) -> list[dict[str, Any]]:
    """The Features QuPath would import from a parsed document (FeatureCollection, array, or one Feature)."""
    if isinstance(doc, list):
        return [f for f in doc if isinstance(f, dict)]
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        return list(doc.get("features") or [])
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    raise ValueError("not a FeatureCollection, a Feature, or an array of Features")


def _check_polygon(geom: Any, what: str, bounds: tuple[float, float] | None) -> list[str]:
    problems: list[str] = []
    if not isinstance(geom, dict) or geom.get("type") != "Polygon":
        return [f"{what} is not a Polygon"]
    rings = geom.get("coordinates") or []
    if not rings:
        return [f"{what} has no rings"]
    for ring in rings:
        if len(ring) < 4 or ring[0] != ring[-1]:
            problems.append(f"{what}: ring not closed or fewer than 4 points")
        if bounds is not None:
            w, h = bounds
            if any(not (0 <= x <= w and 0 <= y <= h) for x, y in ring):
                problems.append(f"{what}: coordinates outside the slide")
        if not on_grid([v for pt in ring for v in pt]):
            problems.append(f"{what}: vertices not on QuPath's 0.01 px grid")
    from shapely.geometry import shape

    if not problems and not shape(geom).is_valid:
        problems.append(f"{what} is not a valid polygon")
    return problems


def check_qupath_feature(f: dict[str, Any], bounds: tuple[float, float] | None = None) -> list[str]:
    """Problems QuPath would have with one Feature, or that would change it on import (empty list: none)."""
    problems: list[str] = []
    if f.get("type") != "Feature":
        problems.append("type is not 'Feature'")
    try:
        uuid.UUID(str(f.get("id")))
    except ValueError:
        problems.append("id is not a UUID")
    props = f.get("properties") or {}
    kind = props.get("objectType")
    if kind not in ("detection", "cell"):
        problems.append("objectType is neither 'detection' nor 'cell'")
    cls = props.get("classification")
    if not isinstance(cls, dict) or not isinstance(cls.get("name"), str):
        problems.append("classification lacks a name")
    elif not (isinstance(cls.get("color"), list) and len(cls["color"]) == 3
              and all(isinstance(v, int) and 0 <= v <= 255 for v in cls["color"])):
        problems.append("classification lacks an [r, g, b] color")
    meas = props.get("measurements", {})
    if not isinstance(meas, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) for k, v in meas.items()
    ):
        problems.append("measurements is not a {name: finite number} object")
    elif QUPATH_OWN_NAMES & set(meas):
        problems.append(f"measurement names QuPath computes itself: {sorted(QUPATH_OWN_NAMES & set(meas))}")
    problems += _check_polygon(f.get("geometry") or {}, "geometry", bounds)
    if kind == "cell":
        problems += _check_polygon(props.get("nucleusGeometry"), "nucleusGeometry", bounds)
    elif "nucleusGeometry" in props:
        problems.append("nucleusGeometry on an object that is not a cell")
    return problems
