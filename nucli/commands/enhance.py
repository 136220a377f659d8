"""`nucli enhance`: GeNSeg-Net's enhancement stage alone, on a run store or an image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nucli.commands import _options as opt
from nucli.commands._common import handle_errors, print_summary
from nucli.commands._options import JsonSummary, OptOutput, Overwrite, Quiet, Weights
from nucli.errors import InputError, UsageError

MAX_IMAGE_PIXELS = 4096 * 4096


@handle_errors
def run(
    source: Annotated[Path, typer.Argument(help="A run store (RUN.zarr from `nucli tile`) or an image file.")],
    output: OptOutput = None,
    png: Annotated[Optional[Path], typer.Option("--png", help="Also write enhanced tiles as PNGs into this folder.")] = None,
    weights: Weights = None,
    batch_size: opt.OptBatchSize = None,
    device: opt.Device = "auto",
    precision: opt.Precision = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_summary: JsonSummary = False,
    workers: opt.Workers = None,
    threads: opt.Threads = None,
    scheduler: opt.Scheduler = None,
    cluster: opt.Cluster = None,
    cluster_config: opt.ClusterConfig = None,
    shard: opt.Shard = None,
) -> None:
    """Enhance nuclei (GeNSeg-Net generator): a run store gets array 'enhanced'; an image gets an enhanced PNG.

    For a run store the enhanced tiles are stored in the store itself (resumable), and `nucli segment` then runs only the U-Net and watershed on them. For an image, -o names the output PNG (default: <image>_enhanced.png beside it).

    Examples:

      Enhance every tile of a run store made by nucli tile:
      nucli enhance slide.zarr

      The same, and also save the enhanced tiles as PNGs:
      nucli enhance slide.zarr --png enhanced/

      Spread the tiles over 2 local Dask worker processes:
      nucli enhance slide.zarr --workers 2

      On the first CUDA GPU, 32 tiles per batch:
      nucli enhance slide.zarr --device cuda:0 --batch-size 32

      Enhance one image into a PNG:
      nucli enhance image.png -o image_enhanced.png
    """
    from nucli.parallel.device import CPU, build_on_device, resolve_device
    from nucli.pipeline import is_run_store

    remote = scheduler is not None or getattr(cluster, "value", cluster) == "slurm"
    dev = resolve_device(device, remote=remote)
    if not source.exists():
        raise InputError(f"{source} does not exist")
    from nucli.outputs import refuse_inputs

    inputs = [("the input", source), ("the weights", weights)]
    refuse_inputs([("-o", output), ("--png", png)], inputs)
    distributed = any(v is not None for v in (workers, threads, scheduler, cluster, cluster_config, shard))
    # Dask workers build their own model on their device; here it only names the stage's settings
    method = build_on_device("gensegnet", weights, CPU if distributed else dev, precision)
    if is_run_store(source):
        if output is not None:
            raise UsageError("-o is for image inputs; a run store is enhanced in place (use --png DIR for pictures)")
        from nucli.parallel import MethodRecipe, make_runner

        with make_runner(workers=workers, threads=threads, scheduler=scheduler, cluster=cluster,
                         cluster_config=cluster_config, device=dev) as runner:
            recipe = (MethodRecipe.create("gensegnet", weights, runner.method_device(), precision)
                      if runner.is_dask else None)
            summary = _enhance_store(source, method, batch_size, overwrite, quiet or json_summary, png,
                                     runner=runner, recipe=recipe, shard=shard, device=dev)
    elif distributed:
        raise UsageError("--workers/--threads/--scheduler/--cluster/--shard are for run stores; "
                         "tile the slide first with `nucli tile`")
    else:
        summary = {**_enhance_image(source, method, output, overwrite), **dev.record()}
    print_summary(summary, as_json=json_summary, quiet=quiet, title="nucli enhance")


def _enhance_store(path: Path, method, batch_size: Optional[int], overwrite: bool, quiet: bool,
                   png: Optional[Path], runner=None, recipe=None, shard=None, device=None) -> dict:
    from nucli.enhance_stage import STAGE, enhance_store, write_pngs
    from nucli.parallel.device import CPU, batch_for
    from nucli.pipeline import track
    from nucli.tiling.store import RunStore

    device = device or CPU
    store = RunStore.open(path, mode="r+")
    bs = batch_for(device, store, method, batch_size)
    todo = int((~store.done(STAGE)).sum()) if store.stage_meta(STAGE) and not overwrite else store.n_tiles
    with track(total=todo, description="Enhancing", enabled=not quiet) as advance:
        counts = enhance_store(store, method, batch_size=bs, overwrite=overwrite, advance=advance,
                               runner=runner, recipe=recipe, shard=shard, device=device.record())
    summary = {"store": str(path), **counts, **device.record(), "batch_size": bs}
    if png is not None:
        summary["pngs"] = write_pngs(store, png)
    return summary


def _enhance_image(path: Path, method, output: Optional[Path], overwrite: bool) -> dict:
    import os
    import tempfile

    from PIL import Image

    from nucli.evaluation.labels_io import read_rgb
    from nucli.models.gensegnet.method import enhanced_to_uint8

    image = read_rgb(path)
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
        raise InputError(f"{path} is too large to enhance whole; tile it first with `nucli tile` and enhance the run store")
    out = Path(output) if output is not None else path.with_name(f"{path.stem}_enhanced.png")
    if out.suffix.lower() != ".png":
        raise UsageError(f"-o {out}: the enhanced image is written as PNG; give a .png path")
    from nucli.outputs import check_replaceable, png_info, refuse_inputs

    refuse_inputs([("-o", out)], [("the input", path)])  # also the default name, beside the image
    check_replaceable(out, overwrite)
    enhanced = enhanced_to_uint8(method.enhance(image[None]))[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        Image.fromarray(enhanced).save(tmp, format="PNG", pnginfo=png_info())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"image": str(path), "output": str(out), "size": f"{image.shape[1]}x{image.shape[0]}"}
