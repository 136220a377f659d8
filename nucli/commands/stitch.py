"""`nucli stitch`: a segmented run store -> global nuclei -> GeoJSON / table / label image / overlay."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nucli.commands import _object_options as obj
from nucli.commands import _options as opt
from nucli.commands._common import handle_errors

StoreArg = Annotated[Path, typer.Argument(help="Run store (RUN.zarr) segmented by `nucli segment`.",
                                          show_default=False)]
Formats = Annotated[
    Optional[list[str]],
    typer.Option("--format", "-f", help="Also write: geojson, geojson.gz, csv, parquet, labels (repeatable)."),
]
OverlayPath = Annotated[
    Optional[Path], typer.Option("--overlay", help="Also draw nucleus outlines on a downsampled slide view (PNG).")
]


@handle_errors
def run(
    store: StoreArg,
    output: opt.Output,
    formats: Formats = None,
    overlay: OverlayPath = None,
    overwrite: opt.Overwrite = False,
    objects: obj.Objects = obj.ObjectsKind.detections,
    cell_expansion: obj.CellExpansion = None,
    positivity: obj.Positivity = None,
    positivity_threshold: obj.PositivityThreshold = None,
    quiet: opt.Quiet = False,
    json_summary: opt.JsonSummary = False,
) -> None:
    """Merge per-tile nuclei into global nuclei (each exactly once) and write the exports.

    STORE holds the per-tile labels written by `nucli segment` (one run, or every --shard job). The -o suffix picks the format (.geojson, .geojson.gz, .csv, .parquet, .zarr for a label image); --format adds more files beside it.

    Examples:

      Once every shard of a run store is segmented, write GeoJSON:
      nucli stitch slide.zarr -o slide.geojson

      GeoJSON plus a measurements table (slide.csv):
      nucli stitch slide.zarr -o slide.geojson --format csv

      Only the table, and an outline overlay:
      nucli stitch slide.zarr -o slide.csv --overlay slide.png
    """
    from nucli.commands._common import print_summary
    from nucli.export import check_outputs, resolve_outputs
    from nucli.pipeline import stitch_to_outputs
    from nucli.tiling.store import RunStore

    exported = obj.options(objects, cell_expansion, positivity, positivity_threshold)
    outputs = resolve_outputs(output, list(formats or []))
    check_outputs([*outputs.values(), *([overlay] if overlay else [])], overwrite, inputs=[("the run store", store)])
    run_store = RunStore.open(store, mode="r")
    summary = stitch_to_outputs(run_store, outputs, overlay=overlay, progress=not (quiet or json_summary),
                                objects=exported)
    print_summary(summary, as_json=json_summary, quiet=quiet, title="nucli stitch")
