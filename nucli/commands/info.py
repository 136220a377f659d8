"""`nucli info SLIDE`: what a slide holds, and what a run on it would take."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nucli.commands import _options as opt
from nucli.commands._common import handle_errors

SlideArg = Annotated[
    Path, typer.Argument(help="Whole-slide file (SVS, NDPI, MRXS, TIFF, ...) or image (PNG/JPEG/TIFF).",
                         show_default=False)
]
Probe = Annotated[
    int,
    typer.Option("--probe", min=0,
                 help="Tiles of this slide to segment for the time estimate (0: no estimate, instant)."),
]
TileSize = Annotated[
    Optional[int], typer.Option("--tile-size", min=16, help="Tile edge in working pixels (default: the method's).")
]


@handle_errors
def run(
    slide: SlideArg,
    method: opt.Method = None,
    weights: opt.Weights = None,
    mpp: opt.MppNumber = None,
    mpp_target: opt.MppTarget = None,
    tile_size: TileSize = None,
    overlap: opt.Overlap = None,
    tissue_mask: opt.TissueMask = True,
    probe: Probe = 2,
    device: opt.Device = "auto",
    quiet: opt.Quiet = False,
    json_summary: opt.JsonSummary = False,
) -> None:
    """Describe a slide and estimate the tiles and time a run would take.

    Shows the size, pyramid levels and downsamples, pixel size, vendor, associated images and tissue fraction; then the tiles a run of the method would process and the time it would take, measured by segmenting a few tiles of this slide on this machine (--probe N; 0 skips it).

    Examples:

      nucli info slide.svs

      nucli info slide.svs --method watershed --json

      nucli info scan.tif --mpp 0.25 --probe 0

      Time the method on the second GPU:
      nucli info slide.svs --device cuda:1
    """
    from contextlib import nullcontext

    from nucli.api import slide_info
    from nucli.commands._common import stderr

    busy = (stderr().status(f"Reading {slide.name}" + (f" and timing the method on {probe} tiles" if probe else ""))
            if not (quiet or json_summary) else nullcontext())
    with busy:
        info = slide_info(slide, method, mpp=mpp, mpp_target=mpp_target, tile_size=tile_size, overlap=overlap,
                          tissue_mask=tissue_mask, probe_tiles=probe, weights=weights, device=device)
    if json_summary:
        from nucli.commands._common import print_summary

        print_summary(info, as_json=True, quiet=quiet, title="nucli info")
        return
    if quiet:
        return
    _print(info)


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _print(info: dict[str, Any]) -> None:
    from rich.table import Table

    from nucli.commands._common import stdout

    con = stdout()
    t = Table(title=f"nucli info: {Path(info['path']).name}", show_header=False, box=None)
    t.add_column(no_wrap=True)
    t.add_column(overflow="fold")
    mpp = info.get("mpp")
    rows = [
        ("file", f"{info['path']} ({info['file_size_mb']:.3g} MB)"),
        ("vendor / reader", f"{info.get('vendor') or '-'} / {info.get('reader')}"),
        ("dimensions", f"{info['width']} x {info['height']} px"
         + (f" ({info['size_mm'][0]:.3g} x {info['size_mm'][1]:.3g} mm)" if info.get("size_mm") else "")),
        ("pixel size", f"{mpp:.4g} µm/px ({info.get('mpp_from')})" if mpp else "unknown (pass --mpp)"),
        ("objective", f"{info['objective_power']:g}x" if info.get("objective_power") else "-"),
        ("modality", info.get("modality")),
        ("associated images", ", ".join(f"{k} {v[0]}x{v[1]}" if v else k
                                        for k, v in info["associated_images"].items()) or "-"),
        ("tissue", "-" if info.get("tissue_fraction") is None else f"{100 * info['tissue_fraction']:.1f} % of the slide"),
    ]
    for k, v in rows:
        t.add_row(f"[bold]{k}[/]", str(v))
    con.print(t)

    lv = Table(title="pyramid levels", box=None)
    for col in ("level", "width", "height", "downsample"):
        lv.add_column(col, justify="right")
    for level in info["levels"]:
        lv.add_row(str(level["level"]), str(level["width"]), str(level["height"]), f"{level['downsample']:g}")
    con.print(lv)

    wm = info.get("working_mpp")
    est = Table(title=f"a run of '{info['method']}'", show_header=False, box=None)
    est.add_column(no_wrap=True)
    est.add_column(overflow="fold")
    for k, v in [
        ("working pixel size", f"{wm:.4g} µm/px (downsample {info['downsample']:g})" if wm else "native resolution"),
        ("working size", f"{info['working_size'][0]} x {info['working_size'][1]} px"),
        ("tiles", f"{info['tiles']} of {info['grid_tiles']} ({info['tile_size']} px, overlap {info['overlap']})"),
        ("seconds per tile", "-" if info.get("seconds_per_tile") is None else f"{info['seconds_per_tile']:.3g}"),
        ("device", f"{info['device']}" + (f" ({info['gpu']})" if info.get("gpu") else "")
         + f"; this machine has: {', '.join(info.get('devices') or ['cpu'])}"),
        ("estimated time", _fmt_seconds(info.get("estimated_seconds"))),
        ("estimate from", info.get("estimate")),
    ]:
        est.add_row(f"[bold]{k}[/]", str(v))
    if info.get("note"):
        est.add_row("[bold]note[/]", info["note"])
    con.print(est)
