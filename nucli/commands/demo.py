"""`nucli demo`: segment a small slide made from real tissue that ships with scikit-image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nucli.commands import _object_options as obj
from nucli.commands import _options as opt
from nucli.commands._common import handle_errors

OutDir = Annotated[Path, typer.Option("-o", "--output", help="Folder for the demo slide and its results.")]
Crop = Annotated[
    Optional[int],
    typer.Option("--crop", min=16, max=512, help="Use only the central CROP x CROP px of the tissue (quicker)."),
]


Stain = Annotated[
    str,
    typer.Option("--stain", help="hematoxylin: the nuclear stain alone (DAB removed by colour deconvolution); "
                                 "ihc: the image as shipped, brown DAB included."),
]


@handle_errors
def run(
    output: OutDir = Path("nucli-demo"),
    method: opt.Method = None,
    weights: opt.Weights = None,
    crop: Crop = None,
    stain: Stain = "hematoxylin",
    device: opt.Device = "auto",
    objects: obj.Objects = obj.ObjectsKind.detections,
    cell_expansion: obj.CellExpansion = None,
    positivity: obj.Positivity = None,
    positivity_threshold: obj.PositivityThreshold = None,
    overwrite: opt.Overwrite = False,
    quiet: opt.Quiet = False,
    json_summary: opt.JsonSummary = False,
) -> None:
    """Segment a demo slide made from real tissue (no download), and show where the results are.

    The tissue is scikit-image's bundled immunohistochemistry image (human colon), written as a small pyramidal slide (0.5 µm/px, assumed; by default its hematoxylin stain alone) and segmented with the default method. Writes GeoJSON (open it in QuPath), a measurements CSV and an overlay PNG. A rerun with the outputs present reports them without recomputing (--overwrite redoes them).

    Examples:

      nucli demo

      nucli demo --method watershed -o /tmp/demo

      nucli demo --json --quiet

      The IHC image with its brown DAB, cells classed Positive/Negative as QuPath's positive cell detection does:
      nucli demo --stain ihc --objects cells --positivity dab
    """
    from nucli.demo import run_demo

    exported = obj.options(objects, cell_expansion, positivity, positivity_threshold)
    summary = run_demo(output, method=method, weights=weights, crop=crop, stain=stain, overwrite=overwrite,
                       progress=not (quiet or json_summary), device=device, objects=exported)
    from nucli.commands._common import print_summary, stdout

    print_summary(summary, as_json=json_summary, quiet=quiet, title="nucli demo")
    if not (quiet or json_summary):
        con = stdout()
        con.print(f"Look at the nuclei: open [bold]{summary['overlay']}[/]", highlight=False, soft_wrap=True)
        con.print(f"In QuPath: open [bold]{summary['slide']}[/], then File > Import objects > "
                  f"[bold]{summary['geojson']}[/] (or drag the file onto the viewer)", highlight=False,
                  soft_wrap=True)
        con.print(f"Measurements, one row per nucleus: [bold]{summary['measurements']}[/]", highlight=False,
                  soft_wrap=True)
