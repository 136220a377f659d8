"""`nucli segment`: slide (or run store) -> nuclei -> GeoJSON / table / label image / overlay."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nucli.commands import _object_options as obj
from nucli.commands import _options as opt
from nucli.commands._common import handle_errors

InputPath = Annotated[
    Path, typer.Argument(help="A slide/image, or a run store (RUN.zarr) made by `nucli tile`.", show_default=False)
]
StorePath = Annotated[
    Optional[Path],
    typer.Option("--store", help="Run store to tile into / resume from (default: OUT's stem + .nucli.zarr)."),
]
Formats = Annotated[
    Optional[list[str]],
    typer.Option("--format", "-f", help="Also write: geojson, geojson.gz, csv, parquet, labels (repeatable)."),
]
OverlayPath = Annotated[
    Optional[Path], typer.Option("--overlay", help="Also draw nucleus outlines on a downsampled slide view (PNG).")
]


@handle_errors
def run(
    source: InputPath,
    output: opt.OptOutput = None,
    method: opt.Method = None,
    store: StorePath = None,
    formats: Formats = None,
    overlay: OverlayPath = None,
    weights: opt.Weights = None,
    batch_size: opt.OptBatchSize = None,
    device: opt.Device = "auto",
    precision: opt.Precision = None,
    tta: opt.Tta = False,
    mpp: opt.Mpp = None,
    mpp_target: opt.MppTarget = None,
    tile_size: Annotated[
        Optional[int], typer.Option("--tile-size", min=64, help="Tile edge in working pixels (default: the method's).")
    ] = None,
    overlap: opt.Overlap = None,
    tissue_mask: opt.TissueMask = True,
    overwrite: opt.Overwrite = False,
    workers: opt.Workers = None,
    threads: opt.Threads = None,
    scheduler: opt.Scheduler = None,
    cluster: opt.Cluster = None,
    cluster_config: opt.ClusterConfig = None,
    shard: opt.Shard = None,
    objects: obj.Objects = obj.ObjectsKind.detections,
    cell_expansion: obj.CellExpansion = None,
    positivity: obj.Positivity = None,
    positivity_threshold: obj.PositivityThreshold = None,
    quiet: opt.Quiet = False,
    json_summary: opt.JsonSummary = False,
) -> None:
    """Find every nucleus: tile the slide (if needed), segment each tile, stitch, export.

    A rerun continues where an interrupted run stopped (finished tiles are kept in the run store). --workers/--scheduler/--cluster spread the tiles over Dask workers; --shard i/n on a run store segments every n-th tile only (for HPC job arrays; run `nucli stitch` once all shards are done).

    Examples:

      The default method (gensegnet); GeoJSON to open in QuPath:
      nucli segment slide.svs -o slide.geojson

      Also a measurements table (slide.csv) and an outline overlay:
      nucli segment slide.svs -o slide.geojson --format csv --overlay slide.png

      HARU-Net, spread over 2 local Dask worker processes:
      nucli segment slide.svs -o slide.geojson --method harunet --workers 2

      On a machine with 4 GPUs: one Dask worker per GPU:
      nucli segment slide.svs -o slide.geojson --device cuda --workers 4

      Ki67 on an IHC slide: QuPath cells classed Positive/Negative by nuclear DAB:
      nucli segment ki67.svs -o ki67.geojson --objects cells --positivity dab

      Job 0 of a 4-job HPC array on a store made by nucli tile:
      nucli segment slide.zarr --shard 0/4
    """
    from nucli.commands._common import print_summary
    from nucli.parallel import make_runner
    from nucli.autoscale import parse_mpp
    from nucli.parallel.device import resolve_device
    from nucli.pipeline import segment_to_outputs

    exported = obj.options(objects, cell_expansion, positivity, positivity_threshold)
    remote = scheduler is not None or getattr(cluster, "value", cluster) == "slurm"
    dev = resolve_device(device, remote=remote)  # a device this machine lacks: one line, nothing created
    with make_runner(workers=workers, threads=threads, scheduler=scheduler, cluster=cluster,
                     cluster_config=cluster_config, device=dev) as runner:
        summary = segment_to_outputs(
            source, output, method=method, store=store, formats=list(formats or []), overlay=overlay,
            weights=weights, batch_size=batch_size, mpp=parse_mpp(mpp), mpp_target=mpp_target, tile_size=tile_size,
            overlap=overlap, tissue_mask=tissue_mask, overwrite=overwrite, progress=not (quiet or json_summary),
            device=dev, precision=precision, runner=runner, shard=shard,
            objects=exported, tta=tta or None,
        )
    print_summary(summary, as_json=json_summary, quiet=quiet, title="nucli segment")
