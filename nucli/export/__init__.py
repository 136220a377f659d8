"""Exports of stitched nuclei: GeoJSON (QuPath), measurements table, label image, overlay.

Formats are chosen by the ``-o`` suffix and/or ``--format`` (several allowed);
further formats are written beside ``-o`` with the same stem::

    -o cmu.geojson --format csv --format labels
      -> cmu.geojson, cmu.csv, cmu.labels.zarr
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nucli.errors import UsageError
from nucli.export._atomic import check_writable

# format name -> suffix written for it (first match wins when reading a suffix)
FORMATS: dict[str, str] = {
    "geojson.gz": ".geojson.gz",
    "geojson": ".geojson",
    "csv": ".csv",
    "parquet": ".parquet",
    "labels": ".labels.zarr",
}
_SUFFIXES: list[tuple[str, str]] = [
    (".geojson.gz", "geojson.gz"),
    (".json.gz", "geojson.gz"),
    (".geojson", "geojson"),
    (".json", "geojson"),
    (".csv", "csv"),
    (".parquet", "parquet"),
    (".labels.zarr", "labels"),
    (".zarr", "labels"),
]
STORE_SUFFIX = ".nucli.zarr"


def split_suffix(path: Path) -> tuple[Path, str | None]:
    """``cmu.geojson.gz`` -> (``cmu``, "geojson.gz"); unknown suffix -> (path, None)."""
    name = path.name
    low = name.lower()
    for suffix, fmt in _SUFFIXES:
        if low.endswith(suffix) and len(name) > len(suffix):
            return path.with_name(name[: -len(suffix)]), fmt
    return path, None


def resolve_outputs(output: Path, formats: list[str] | None = None) -> dict[str, Path]:
    """Map each requested format to its output path (see module docstring)."""
    output = Path(output)
    base, fmt = split_suffix(output)
    wanted: dict[str, Path] = {}
    if fmt is not None:
        wanted[fmt] = output
    for f in formats or []:
        key = f.lower().lstrip(".")
        if key in ("zarr", "label", "label-image"):
            key = "labels"
        if key == "json":
            key = "geojson"
        if key not in FORMATS:
            raise UsageError(f"unknown --format '{f}'; choose from: {', '.join(FORMATS)}")
        wanted.setdefault(key, base.with_name(base.name + FORMATS[key]))
    if not wanted:
        raise UsageError(
            f"cannot tell the output format from '{output.name}'; end -o in "
            ".geojson, .geojson.gz, .csv, .parquet or .zarr, or pass --format"
        )
    if "parquet" in wanted:
        from nucli.export.measurements import parquet_available

        if not parquet_available():
            raise UsageError("Parquet output needs pyarrow (`pip install pyarrow`); or write .csv")
    return wanted


def default_store_path(output: Path) -> Path:
    """The run store beside the output: ``cmu.geojson`` -> ``cmu.nucli.zarr``."""
    base, _ = split_suffix(Path(output))
    return base.with_name(base.name + STORE_SUFFIX)


def check_outputs(paths: list[Path], overwrite: bool, inputs: list[tuple[str, Path | None]] = ()) -> None:
    """Before any work: refuse an output that is (or is inside) one of ``inputs`` ((what, path) pairs),
    one path for two outputs, an existing output without ``overwrite``, and with ``overwrite`` anything
    nucli did not write (:mod:`nucli.outputs`)."""
    from nucli.outputs import check_replaceable, refuse_inputs

    refuse_inputs([("output", Path(p)) for p in paths], list(inputs))
    seen: set[Path] = set()
    for p in paths:
        rp = Path(p).resolve()
        if rp in seen:
            raise UsageError(f"{p} is named for two outputs; give each output its own path")
        seen.add(rp)
        check_replaceable(Path(p), overwrite)
        check_writable(Path(p))


def make_sinks(outputs: dict[str, Path], overlay: Path | None = None, objects: Any = None) -> list[Any]:
    """One exporter per output; with ``objects`` (:class:`nucli.export.cells.ObjectOptions` asking for cells
    or positivity) behind one :class:`~nucli.export.cells.ObjectStage` that adds them."""
    from nucli.export.geojson import GeoJSONSink
    from nucli.export.labels import LabelImageSink
    from nucli.export.measurements import MeasurementsSink
    from nucli.export.overlay import OverlaySink

    sinks: list[Any] = []
    for fmt, path in outputs.items():
        if fmt in ("geojson", "geojson.gz"):
            sinks.append(GeoJSONSink(path, objects))
        elif fmt in ("csv", "parquet"):
            sinks.append(MeasurementsSink(path, fmt, objects))
        elif fmt == "labels":
            sinks.append(LabelImageSink(path))
    if overlay is not None:
        sinks.append(OverlaySink(overlay))
    if objects is not None and objects.active:
        from nucli.export.cells import ObjectStage

        return [ObjectStage(sinks, objects)]
    return sinks
