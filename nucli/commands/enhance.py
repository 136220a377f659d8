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
    png: Annotated[Optional[Path], typer.Option("--png", help="Run store: also write the enhanced tiles as PNGs into this folder. Image: the enhanced PNG (a .png path, or a folder to write <image>_enhanced.png into), like -o.")] = None,
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
    store_input = is_run_store(source)
    # every output is checked before the model is built: never an input, replaced only with --overwrite and
    # only when nucli wrote it
    if store_input:
        if png is not None:
            from nucli.enhance_stage import check_png_folder
            from nucli.tiling.store import RunStore

            check_png_folder(RunStore.open(source), png, overwrite)
    else:
        if output is not None and png is not None:
            raise UsageError("-o and --png both name the enhanced image of an image input; give one of them")
        output = _image_output(source, output if png is None else png, via_png=png is not None)
        refuse_inputs([("--png" if png is not None else "-o", output)], inputs)  # also the default name
        from nucli.outputs import check_replaceable

        check_replaceable(output, overwrite)
    # Dask workers build their own model on their device; here it only names the stage's settings
    method = build_on_device("gensegnet", weights, CPU if distributed else dev, precision)
    if store_input:
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


def _image_output(path: Path, given: Optional[Path], via_png: bool) -> Path:
    """The enhanced PNG of an image input: ``given`` (-o FILE.png; --png FILE.png or --png FOLDER), else
    <image>_enhanced.png beside the image."""
    name = f"{path.stem}_enhanced.png"
    if given is None:
        return path.with_name(name)
    given = Path(given)
    if via_png and (given.is_dir() or given.suffix.lower() != ".png"):
        return given / name
    if given.suffix.lower() != ".png":
        raise UsageError(f"-o {given}: the enhanced image is written as PNG; give a .png path")
    return given


def _enhance_image(path: Path, method, out: Path, overwrite: bool) -> dict:
    from PIL import Image

    from nucli.evaluation.labels_io import read_rgb
    from nucli.export._atomic import AtomicFile, check_writable
    from nucli.models.gensegnet.method import enhanced_to_uint8
    from nucli.outputs import png_info

    image = read_rgb(path)
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
        raise InputError(f"{path} is too large to enhance whole; tile it first with `nucli tile` and enhance the run store")
    check_writable(out)
    enhanced = enhanced_to_uint8(method.enhance(image[None]))[0]
    f = AtomicFile(out, binary=True)  # appears only when complete; normal permissions
    try:
        Image.fromarray(enhanced).save(f.handle, format="PNG", pnginfo=png_info())
        f.commit()
    except BaseException:
        f.discard()
        raise
    return {"image": str(path), "output": str(out), "size": f"{image.shape[1]}x{image.shape[0]}"}
