"""Per-nucleus (and per-cell) measurements and the measurements table (CSV, or Parquet with pyarrow).

Every nucleus value is computed from the owning tile's pixels at the working
resolution and scaled: lengths by the downsample (level-0 px) and by µm per
working px (µm), areas by their squares. Polygon measurements (perimeter,
circularity, solidity, and every cell shape value) are computed from the polygon
exactly as written to the GeoJSON (level-0 px, on QuPath's 0.01 px grid). When
the slide's pixel size is unknown the µm columns are left out (CSV) / not
written (GeoJSON).

GeoJSON names follow QuPath's own cell detection (``Nucleus: ...``, ``Cell: ...``,
``Cytoplasm: ...``), so that they never collide with the measurements QuPath
computes from an object's outline (``Centroid X µm``, ``Area µm^2``,
``Circularity``, ... of *Add shape features* on detections). The CSV holds the
same values under the column names listed in :func:`columns` (one-to-one; see
docs/outputs.md for the table). Areas: ``area_*`` / ``Nucleus: Area`` count the
nucleus' pixels (103 px² for 103 pixels); ``cell_area_*`` / ``Cell: Area`` are
the area of the cell polygon (its boundary follows pixel edges, so it is the
cell's pixel count up to the 0.01 px rounding).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nucli.stitching import Sink
from nucli.export._atomic import AtomicFile


@dataclass(frozen=True)
class Column:
    key: str  # CSV column
    qupath: str | None  # GeoJSON measurement name (None: CSV only)
    needs_mpp: bool = False


CHANNEL = {True: ("hematoxylin", "Hematoxylin OD"), False: ("intensity", "Intensity")}


def columns(*, has_mpp: bool, brightfield: bool, has_scores: bool, cells: bool = False, dab: bool = False,
            classified: bool = False) -> list[Column]:
    """The measurement columns for one slide, in table order (CSV key, GeoJSON name)."""
    ch, chq = CHANNEL[bool(brightfield)]
    cols = [
        Column("id", None),
        Column("label", None),
        Column("centroid_x_px", "Nucleus: Centroid X px"),
        Column("centroid_y_px", "Nucleus: Centroid Y px"),
        Column("centroid_x_um", "Nucleus: Centroid X µm", True),
        Column("centroid_y_um", "Nucleus: Centroid Y µm", True),
        Column("area_px2", "Nucleus: Area px^2"),
        Column("area_um2", "Nucleus: Area µm^2", True),
        Column("perimeter_px", "Nucleus: Perimeter px"),
        Column("perimeter_um", "Nucleus: Perimeter µm", True),
        Column("equivalent_diameter_px", "Nucleus: Equivalent diameter px"),
        Column("equivalent_diameter_um", "Nucleus: Equivalent diameter µm", True),
        Column("major_axis_px", "Nucleus: Major axis px"),
        Column("major_axis_um", "Nucleus: Major axis µm", True),
        Column("minor_axis_px", "Nucleus: Minor axis px"),
        Column("minor_axis_um", "Nucleus: Minor axis µm", True),
        Column("eccentricity", "Nucleus: Eccentricity"),
        Column("solidity", "Nucleus: Solidity"),
        Column("circularity", "Nucleus: Circularity"),
        Column("orientation_deg", "Nucleus: Orientation °"),
        Column(f"{ch}_mean", f"Nucleus: {chq} mean"),
        Column(f"{ch}_std", f"Nucleus: {chq} std dev"),
    ]
    if dab:
        cols += [Column("dab_mean", "Nucleus: DAB OD mean"), Column("dab_std", "Nucleus: DAB OD std dev")]
    if has_scores:
        cols.append(Column("score", "Nucleus: Score"))
    if cells:
        cols += [
            Column("cell_area_px2", "Cell: Area px^2"),
            Column("cell_area_um2", "Cell: Area µm^2", True),
            Column("cell_perimeter_px", "Cell: Perimeter px"),
            Column("cell_perimeter_um", "Cell: Perimeter µm", True),
            Column("cell_circularity", "Cell: Circularity"),
            Column("cell_solidity", "Cell: Solidity"),
            Column("nucleus_cell_area_ratio", "Nucleus/Cell area ratio"),
            Column(f"cell_{ch}_mean", f"Cell: {chq} mean"),
            Column(f"cytoplasm_{ch}_mean", f"Cytoplasm: {chq} mean"),
        ]
        if dab:
            cols += [Column("cell_dab_mean", "Cell: DAB OD mean"), Column("cytoplasm_dab_mean", "Cytoplasm: DAB OD mean")]
    if classified:
        cols.append(Column("class", None))  # last: the table opens with the same columns in every run
    return [c for c in cols if has_mpp or not c.needs_mpp]


def columns_for(frame: Any, options: Any = None) -> list[Column]:
    """The columns of one export: the slide (``frame``) and the object options (cells, positivity)."""
    return columns(has_mpp=frame.um_per_px is not None, brightfield=frame.brightfield, has_scores=frame.has_scores,
                   cells=bool(options is not None and options.cells),
                   dab=bool(options is not None and options.positivity is not None),
                   classified=bool(options is not None and options.positivity is not None))


def measure(
    mask: np.ndarray,
    channel: np.ndarray,
    *,
    x0: int,
    y0: int,
    perimeter_w: float,
    polygon_area_w: float,
    polygon_hull_area_w: float,
    downsample: float,
    um_per_px: float | None,
    brightfield: bool,
) -> dict[str, float]:
    """Measurements of one nucleus.

    ``mask``: bool (h, w) crop at working resolution whose top-left pixel is at
    working ``(x0, y0)``; ``channel``: the nucleus channel over the same crop;
    ``perimeter_w`` / ``polygon_area_w`` / ``polygon_hull_area_w``: length, area and convex-hull
    area of the exported polygon, working px.
    """
    mask = np.asarray(mask, bool)
    rr, cc = np.nonzero(mask)
    n = float(len(rr))
    d = float(downsample)
    cy_w = float(rr.mean()) + 0.5 + y0
    cx_w = float(cc.mean()) + 0.5 + x0

    # second central moments of the pixel set; + 1/12: the variance of a uniform unit pixel
    dx, dy = cc - cc.mean(), rr - rr.mean()
    mxx = float(np.dot(dx, dx)) / n + 1.0 / 12.0
    myy = float(np.dot(dy, dy)) / n + 1.0 / 12.0
    mxy = float(np.dot(dx, dy)) / n
    common = math.sqrt(max(((mxx - myy) / 2.0) ** 2 + mxy * mxy, 0.0))
    l1 = (mxx + myy) / 2.0 + common
    l2 = max((mxx + myy) / 2.0 - common, 0.0)
    major = 4.0 * math.sqrt(l1)
    minor = 4.0 * math.sqrt(l2)
    ecc = math.sqrt(1.0 - l2 / l1) if l1 > 0 else 0.0
    orient = 0.5 * math.degrees(math.atan2(2.0 * mxy, mxx - myy))
    if orient <= -90.0:
        orient += 180.0

    hull_area = polygon_hull_area_w
    solidity = min(1.0, polygon_area_w / hull_area) if hull_area > 0 else 1.0
    circ = 4.0 * math.pi * polygon_area_w / (perimeter_w * perimeter_w) if perimeter_w > 0 else 0.0
    vals = channel[mask].astype(np.float64)

    out: dict[str, float] = {
        "centroid_x_px": cx_w * d,
        "centroid_y_px": cy_w * d,
        "area_px2": n * d * d,
        "perimeter_px": perimeter_w * d,
        "equivalent_diameter_px": math.sqrt(4.0 * n / math.pi) * d,
        "major_axis_px": major * d,
        "minor_axis_px": minor * d,
        "eccentricity": ecc,
        "solidity": solidity,
        "circularity": circ,
        "orientation_deg": orient,
        "channel_mean": float(vals.mean()),
        "channel_std": float(vals.std()),
    }
    if um_per_px:
        u = float(um_per_px)  # µm per working px
        out.update(
            centroid_x_um=cx_w * u,
            centroid_y_um=cy_w * u,
            area_um2=n * u * u,
            perimeter_um=perimeter_w * u,
            equivalent_diameter_um=math.sqrt(4.0 * n / math.pi) * u,
            major_axis_um=major * u,
            minor_axis_um=minor * u,
        )
    return out


def measurements_from_stats(
    stats: dict[str, np.ndarray],
    labels: np.ndarray,
    cx_w: np.ndarray,
    cy_w: np.ndarray,
    *,
    polygon_area_w: np.ndarray,
    perimeter_w: np.ndarray,
    polygon_hull_area_w: np.ndarray,
    downsample: float,
    um_per_px: float | None,
) -> list[dict[str, float]]:
    """:func:`measure` for many nuclei at once: one dict per entry of ``labels``.

    ``stats``: per-label arrays indexed by label (``count``, centred second moments ``mxx``/``myy``/``mxy``,
    ``channel_mean``/``channel_std``); ``cx_w``/``cy_w`` (centroids, working px, pixel centres at +0.5) and
    the polygon arrays are per entry of ``labels`` (NaN where a nucleus has no outline).
    """
    labels = np.asarray(labels)
    d = float(downsample)
    n = stats["count"][labels]
    mxx = stats["mxx"][labels] + 1.0 / 12.0
    myy = stats["myy"][labels] + 1.0 / 12.0
    mxy = stats["mxy"][labels]
    common = np.sqrt(np.maximum(((mxx - myy) / 2.0) ** 2 + mxy * mxy, 0.0))
    l1 = (mxx + myy) / 2.0 + common
    l2 = np.maximum((mxx + myy) / 2.0 - common, 0.0)
    major, minor = 4.0 * np.sqrt(l1), 4.0 * np.sqrt(l2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ecc = np.where(l1 > 0, np.sqrt(np.maximum(1.0 - l2 / l1, 0.0)), 0.0)
        area = np.asarray(polygon_area_w, np.float64)
        hull = np.asarray(polygon_hull_area_w, np.float64)
        per = np.asarray(perimeter_w, np.float64)
        solidity = np.where(hull > 0, np.minimum(1.0, area / hull), 1.0)
        circ = np.where(per > 0, 4.0 * math.pi * area / (per * per), 0.0)
    orient = 0.5 * np.degrees(np.arctan2(2.0 * mxy, mxx - myy))
    orient = np.where(orient <= -90.0, orient + 180.0, orient)
    cx, cy = np.asarray(cx_w, np.float64), np.asarray(cy_w, np.float64)
    eq = np.sqrt(4.0 * n / math.pi)
    cols: dict[str, np.ndarray] = {
        "centroid_x_px": cx * d,
        "centroid_y_px": cy * d,
        "area_px2": n * d * d,
        "perimeter_px": per * d,
        "equivalent_diameter_px": eq * d,
        "major_axis_px": major * d,
        "minor_axis_px": minor * d,
        "eccentricity": ecc,
        "solidity": solidity,
        "circularity": circ,
        "orientation_deg": orient,
        "channel_mean": stats["channel_mean"][labels],
        "channel_std": stats["channel_std"][labels],
    }
    if um_per_px:
        u = float(um_per_px)  # µm per working px
        cols.update(centroid_x_um=cx * u, centroid_y_um=cy * u, area_um2=n * u * u, perimeter_um=per * u,
                    equivalent_diameter_um=eq * u, major_axis_um=major * u, minor_axis_um=minor * u)
    keys = list(cols)
    table = np.stack([cols[k] for k in keys], axis=1).tolist()
    return [dict(zip(keys, row)) for row in table]


def row_values(nucleus: Any, cols: list[Column], brightfield: bool) -> dict[str, Any]:
    """A nucleus' values keyed by column key (channel columns renamed for the modality)."""
    m = dict(nucleus.measurements)
    ch = CHANNEL[bool(brightfield)][0]
    for part in ("", "cell_", "cytoplasm_"):
        m[f"{part}{ch}_mean"] = m.pop(f"{part}channel_mean", float("nan"))
    m[f"{ch}_std"] = m.pop("channel_std", float("nan"))
    m["id"] = nucleus.uid
    m["label"] = nucleus.label
    m["class"] = getattr(nucleus, "classification", None) or ""
    m["score"] = nucleus.score if nucleus.score is not None else float("nan")
    return {c.key: m.get(c.key, float("nan")) for c in cols}


def _fmt(value: Any) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return "" if math.isnan(v) else repr(round(v, 4))
    return str(value)


class MeasurementsSink(Sink):
    """Streams one table row per nucleus to CSV or Parquet (atomic: temp file, then rename)."""

    def __init__(self, path: Path, fmt: str = "csv", options: Any = None):
        self.path = Path(path)
        self.fmt = fmt
        self.options = options
        self._file: AtomicFile | None = None
        self._writer: Any = None
        self._rows: list[dict[str, Any]] = []
        self.count = 0

    def open(self, frame: Any) -> None:
        self.brightfield = frame.brightfield
        self.cols = columns_for(frame, self.options)
        if self.fmt == "parquet":
            _require_pyarrow()
            self._file = AtomicFile(self.path, binary=True)
            self._pq_writer = None
        else:
            self._file = AtomicFile(self.path, binary=False, newline="")
            self._writer = csv.writer(self._file.handle, lineterminator="\n")
            self._writer.writerow([c.key for c in self.cols])

    def add(self, nucleus: Any) -> None:
        row = row_values(nucleus, self.cols, self.brightfield)
        self.count += 1
        if self.fmt == "parquet":
            self._rows.append(row)
            if len(self._rows) >= 50_000:
                self._flush_parquet()
        else:
            self._writer.writerow([_fmt(row[c.key]) for c in self.cols])

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows and self._pq_writer is not None:
            return
        data = {c.key: [r[c.key] for r in self._rows] for c in self.cols}
        types = {c.key: (pa.string() if c.key in ("id", "class") else pa.int64() if c.key == "label" else pa.float64())
                 for c in self.cols}
        table = pa.table({k: pa.array(v, type=types[k]) for k, v in data.items()})
        if self._pq_writer is None:
            self._pq_writer = pq.ParquetWriter(self._file.handle, table.schema)
        self._pq_writer.write_table(table)
        self._rows = []

    def close(self) -> None:
        if self.fmt == "parquet":
            self._flush_parquet()
            if self._pq_writer is not None:
                self._pq_writer.close()
        if self._file is not None:
            self._file.commit()

    def abort(self) -> None:
        if self._file is not None:
            self._file.discard()


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        from nucli.errors import UsageError

        raise UsageError("Parquet output needs pyarrow (`pip install pyarrow`); or write .csv") from None


def parquet_available() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["Column", "columns", "columns_for", "measure", "MeasurementsSink", "parquet_available"]
