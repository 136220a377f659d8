"""`nucli tile SLIDE -o RUN.zarr`: cut a slide into tiles at the working pixel size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nucli.commands._common import handle_errors, print_summary
from nucli.commands._options import (JsonSummary, Method, Mpp, MppTarget, Output, Overlap, Overwrite, Quiet,
                                     TissueMask)

TileSizeOpt = Annotated[
    Optional[int],
    typer.Option("--tile-size", min=16, help="Tile edge in working pixels (default: the method's)."),
]


@handle_errors
def run(
    slide: Annotated[Path, typer.Argument(help="Whole-slide file (SVS, NDPI, MRXS, TIFF, ...) or image (PNG/JPEG/TIFF).",
                                          show_default=False)],
    output: Output,
    mpp: Mpp = None,
    mpp_target: MppTarget = None,
    method: Method = None,
    tile_size: TileSizeOpt = None,
    overlap: Overlap = None,
    tissue_mask: TissueMask = True,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_summary: JsonSummary = False,
) -> None:
    """Cut SLIDE into overlapping tiles at the working pixel size, keeping only tiles that touch
    tissue, into the run store RUN.zarr. Rerun the same command to resume an interrupted run.

    Pixel size, tile size and overlap default to the method's (see `nucli models`); `nucli info SLIDE` shows beforehand how many tiles a run would make. Segment the store with `nucli segment RUN.zarr -o OUT.geojson`.

    Examples:

      Tile for the default method (gensegnet):
      nucli tile slide.svs -o slide.zarr

      Tile for HARU-Net, to segment the store with --method harunet:
      nucli tile slide.svs -o slide.zarr --method harunet

      An image without pixel-size metadata, scanned at 0.25 µm/px:
      nucli tile scan.tif -o scan.zarr --mpp 0.25

      Larger tiles; the overlap must exceed the largest nucleus:
      nucli tile slide.svs -o slide.zarr --tile-size 1024 --overlap 160
    """
    from nucli.autoscale import parse_mpp
    from nucli.tiling.tiler import run_tiling

    report = run_tiling(
        slide, output, mpp=parse_mpp(mpp), mpp_target=mpp_target, method=method, tile_size=tile_size, overlap=overlap,
        tissue_mask=tissue_mask, overwrite=overwrite, progress=not (quiet or json_summary),
    )
    print_summary(report.summary(), as_json=json_summary, quiet=quiet, title="nucli tile")
