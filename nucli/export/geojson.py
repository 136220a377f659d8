"""GeoJSON for QuPath: one detection Feature per nucleus, written as a stream.

What QuPath's reader relies on (and :func:`check_qupath_feature` tests):

* a ``FeatureCollection`` (or a bare array of Features);
* each Feature has a UUID ``id`` -- here a v5 UUID derived from the slide
  fingerprint, the tile and the nucleus' pixels, so the same input always gives
  byte-identical output;
* ``geometry`` a ``Polygon`` with closed rings (first point == last), valid,
  in level-0 pixel coordinates with the origin at the slide's top-left;
* ``properties.objectType = "detection"`` (not an annotation);
* ``properties.classification = {"name": "Nucleus", "color": [r, g, b]}`` --
  QuPath ignores a classification without a colour;
* ``properties.measurements = {name: number}`` (finite numbers only).

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
from nucli.export.measurements import Column, columns, row_values

CLASS_NAME = "Nucleus"
CLASS_COLOR = [0, 200, 0]
COORD_DECIMALS = 3


def feature(nucleus: Any, cols: list[Column], brightfield: bool) -> dict[str, Any]:
    """One nucleus as a QuPath detection Feature (``cols``: from :func:`columns`)."""
    ring = [[round(float(x), COORD_DECIMALS), round(float(y), COORD_DECIMALS)]
            for x, y in nucleus.polygon.exterior.coords]
    if ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    values = row_values(nucleus, cols, brightfield)
    meas = {}
    for c in cols:
        v = values.get(c.key)
        if c.qupath is None or v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            meas[c.qupath] = round(v, 4)
    return {
        "type": "Feature",
        "id": nucleus.uid,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": CLASS_NAME, "color": list(CLASS_COLOR)},
            "measurements": meas,
        },
    }


class GeoJSONSink(Sink):
    """Streams a FeatureCollection to ``path`` (``.gz``: gzipped); atomic."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.gz = self.path.name.lower().endswith(".gz")
        self._file: AtomicFile | None = None
        self._cols: list[Column] = []
        self.count = 0

    def open(self, frame: Any) -> None:
        self.brightfield = frame.brightfield
        self._cols = columns(has_mpp=frame.um_per_px is not None, brightfield=frame.brightfield,
                             has_scores=frame.has_scores)
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


def check_qupath_feature(f: dict[str, Any], bounds: tuple[float, float] | None = None) -> list[str]:
    """Problems QuPath would have with one Feature (empty list: none)."""
    problems: list[str] = []
    if f.get("type") != "Feature":
        problems.append("type is not 'Feature'")
    try:
        uuid.UUID(str(f.get("id")))
    except ValueError:
        problems.append("id is not a UUID")
    props = f.get("properties") or {}
    if props.get("objectType") != "detection":
        problems.append("objectType is not 'detection'")
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
    geom = f.get("geometry") or {}
    if geom.get("type") != "Polygon":
        problems.append("geometry is not a Polygon")
        return problems
    rings = geom.get("coordinates") or []
    if not rings:
        problems.append("polygon has no rings")
        return problems
    for ring in rings:
        if len(ring) < 4 or ring[0] != ring[-1]:
            problems.append("ring not closed or fewer than 4 points")
        if bounds is not None:
            w, h = bounds
            if any(not (0 <= x <= w and 0 <= y <= h) for x, y in ring):
                problems.append("coordinates outside the slide")
    from shapely.geometry import shape

    if not problems and not shape(geom).is_valid:
        problems.append("polygon is not valid")
    return problems
