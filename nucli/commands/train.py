"""`nucli train`: train a method on DIR/images + DIR/labels and write weights, config and model card."""

from __future__ import annotations

import functools
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from nucli.commands._common import handle_errors, print_summary
from nucli.commands._options import Device, JsonSummary, Method, Output, Overwrite, Quiet
from nucli.errors import InputError, OutputExistsError, UsageError


def _resume_hint(func):
    """Ctrl-C while training: say that the checkpoints are kept and ``--resume`` continues from them."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            if kwargs.get("method") == "synth":  # writes pairs, keeps no checkpoints
                raise
            raise KeyboardInterrupt("Checkpoints are saved; rerun the same command with --resume to continue "
                                    "from the last one.") from None

    return wrapper


class Preset(str, Enum):
    cpu = "cpu"
    cpu_long = "cpu-long"
    paper = "paper"


@handle_errors
@_resume_hint
def run(
    output: Output,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="Training data: DIR/images/*.png + DIR/labels/*.tif; or, repeated, sets with train/, val/ and index.json (or a .json manifest of {path, weight}): trained together at one working scale.")] = None,
    method: Method = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation data (same layout), for model selection.")] = None,
    preset: Annotated[Preset, typer.Option("--preset", help="cpu: narrow, ~1 h on 2 cores; cpu-long (gensegnet): cpu plus a second GAN phase and a longer fine-tune, ~3 h; paper: the paper's widths/epochs.")] = Preset.cpu,
    epochs: Annotated[Optional[float], typer.Option("--epochs", min=0.01, help="Epochs of the first stage (others scale with it).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoints in OUTDIR.")] = False,
    finetune: Annotated[bool, typer.Option("--finetune/--no-finetune", help="gensegnet: also fine-tune the U-Net on generator outputs (kept only if better on val).")] = True,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Torch CPU threads.")] = None,
    device: Device = "auto",
    init: Annotated[Optional[Path], typer.Option("--init", help="several sets: weights to start from (default: the shipped weights of the method).")] = None,
    stain_aug: Annotated[bool, typer.Option("--stain-aug/--no-stain-aug", help="several sets: HED stain, simulated IHC, blur/JPEG/noise augmentation.")] = True,
    lr: Annotated[Optional[float], typer.Option("--lr", min=1e-7, max=1.0, help="several sets: peak learning rate (default 2e-4; constant for the first half, then linear decay to 0).")] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", min=1, max=64, help="several sets: crops per step (default 6 gensegnet, 4 harunet).")] = None,
    input_channels: Annotated[Optional[int], typer.Option("--input-channels", min=1, max=3, help="several sets, gensegnet: 3 also feeds the red and blue channels of brightfield colour images (1-channel --init weights are widened, new inputs starting at zero); default: as in --init.")] = None,
    # --- mcf only (templates instead of labels) ---
    templates: Annotated[Optional[Path], typer.Option("--templates", help="mcf: folder of nucleus crops, or a GeoJSON of points/boxes (with --template-image).")] = None,
    template_image: Annotated[Optional[Path], typer.Option("--template-image", help="mcf: the image a --templates GeoJSON was drawn on.")] = None,
    template_diameter: Annotated[Optional[float], typer.Option("--template-diameter", min=1.0, help="mcf: nucleus diameter (px) for GeoJSON points without one.")] = None,
    from_labels: Annotated[Optional[Path], typer.Option("--from-labels", help="mcf: draw --n template nuclei from this labelled set (experiments).")] = None,
    n_templates: Annotated[int, typer.Option("--n", min=1, help="mcf: number of nuclei drawn by --from-labels.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of training (crop sampling, augmentation) with --data; mcf: also of the --from-labels draw.")] = 0,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="mcf: mutual-complementing rounds.")] = 3,
    # --- spatialprior (no labels of the new stain) and synthesis ---
    images: Annotated[Optional[Path], typer.Option("--images", help="spatialprior: unlabelled images of the stain to learn (a folder).")] = None,
    prior_masks: Annotated[Optional[Path], typer.Option("--prior-masks", help="spatialprior: label/mask images of nuclei of any other stain (unpaired).")] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", min=0.1, max=10.0, help="spatialprior: rescale factor bringing --images to the masks' nucleus size (default: estimated).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="spatialprior / --synth style: training steps (default: the preset's).")] = None,
    synth: Annotated[Optional[SynthMode], typer.Option("--synth", help="style: train gensegnet's segmentation U-Net with style-consistent synthetic images.")] = None,
    count: Annotated[Optional[int], typer.Option("--count", min=1, help="synth: number of image/label pairs to write (default 100).")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="synth: a synth_refiner.safetensors to restyle the pairs with AdaIN.")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_summary: JsonSummary = False,
) -> None:
    """Train a method (both GeNSeg-Net stages) with checkpoints, loss logs and val-based selection.

    --data and --val hold images/*.png and labels/*.tif; -o names the output folder for the checkpoints, loss logs and weights. mcf learns from a few template nuclei instead of labels (--templates, or --from-labels for experiments), so its --data needs only images/.

    Examples:

      GeNSeg-Net (the default), selected on a validation set:
      nucli train --data train/ --val val/ -o runs/gensegnet

      HARU-Net on the same data:
      nucli train --method harunet --data train/ --val val/ -o runs/harunet

      MCF from a folder of nucleus crops:
      nucli train --method mcf --data train/ --templates crops/ -o runs/mcf

      Continue an interrupted run from its last checkpoint:
      nucli train --data train/ --val val/ -o runs/gensegnet --resume
    """
    if method is not None and not method.strip():
        raise UsageError("--method is empty; name the method to train (e.g. --method gensegnet), or leave "
                         "--method out for gensegnet")
    name = "gensegnet" if method is None else method
    dev = _training_device(device, name, synth is None and not (data and _is_multiset(list(data))))
    if name == "spatialprior":
        if images is None or prior_masks is None:
            raise UsageError("--method spatialprior needs --images DIR (unlabelled images of the new stain) "
                             "and --prior-masks DIR (label images of nuclei of any stain)")
    elif data is None:
        raise UsageError("--data DIR is required (images/ + labels/, like dsb2018/train)")
    if synth is not None and name != "gensegnet":
        raise UsageError(f"--synth style trains the gensegnet segmentation U-Net; '{name}' is not supported "
                         "(write pairs with --method synth and train on them instead)")
    if preset is Preset.cpu_long and (name != "gensegnet" or synth is not None):
        raise UsageError(f"--preset cpu-long is for --method gensegnet; '{name}' has cpu and paper")
    data_list = list(data or [])
    if data_list and _is_multiset(data_list):
        if name not in ("gensegnet", "harunet"):
            raise UsageError(f"training on several sets supports --method gensegnet and harunet, not '{name}'")
        if val is not None:
            raise UsageError("with sets (train/ + val/ + index.json) each set's val/ is used; drop --val")
        if input_channels not in (None, 1, 3):
            raise UsageError(f"--input-channels takes 1 or 3, not {input_channels}")
        _train_multi(name, data_list, Path(output), init, steps, batch, stain_aug, resume, overwrite, threads, seed,
                     quiet, json_summary, lr, input_channels)
        return
    if len(data_list) > 1:
        raise UsageError("several --data folders must each be a set with train/ and val/ (like ../shared/data/monuseg)")
    data = data_list[0] if data_list else None
    for d, what in ((data, "--data"), (val, "--val")):
        if d is not None and not (Path(d) / "images").is_dir():
            raise InputError(f"{what} {d} must hold images/ and labels/ folders (like dsb2018/train)")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InputError(f"-o {output} exists and is not a folder")
    if output.exists() and any(output.iterdir()) and not (resume or overwrite):
        raise OutputExistsError(f"{output} is not empty; pass --resume to continue or --overwrite to start over")
    if overwrite and not resume and output.exists():
        for f in output.glob("*.ckpt.safetensors"):
            f.unlink()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create -o {output}: {exc.strerror or exc}") from None
    if name in ("spatialprior", "synth") or synth is not None:
        _spatialprior_or_synth(name, data, output, images, prior_masks, scale, steps, synth, count, weights,
                               preset.value, resume, threads, seed, overwrite, quiet, json_summary)
        return
    if name == "mcf":  # templates instead of labels: its own option checks and procedure
        from nucli.models.mcf.train_cli import train_from_options

        with _progress(quiet) as progress:
            summary = train_from_options(data, output, templates=templates, template_image=template_image,
                                         template_diameter=template_diameter, from_labels=from_labels,
                                         n=n_templates, seed=seed, rounds=rounds, val=val, resume=resume,
                                         threads=threads, progress=progress)
        print_summary({"weights": summary["weights"], "detection-only weights": summary["weights_detection_only"],
                       "templates": summary["templates"], "wall seconds": summary["wall_s"]},
                      as_json=json_summary, quiet=quiet, title="nucli train")
        return
    if name == "harunet":
        from nucli.training.harunet_train import train_from_options as train_harunet

        with _progress(quiet) as progress:
            summary = train_harunet(data, output, val, preset=preset.value, epochs=epochs, resume=resume,
                                    threads=threads, progress=progress, device=dev)
        print_summary({"weights": summary["weights"], "steps": summary["steps"], "best step": summary["best_step"],
                       **dev.record(),
                       "wall seconds": summary["wall_s"], **{f"val {k}": v for k, v in summary.get("val_tuned", {}).items()}},
                      as_json=json_summary, quiet=quiet, title="nucli train")
        return
    if name != "gensegnet":
        raise UsageError(f"`nucli train` supports --method gensegnet in this version, not '{name}'")

    from nucli.training.gensegnet import train_gensegnet

    with _progress(quiet) as progress:
        summary = train_gensegnet(data, output, val, preset=preset.value, epochs=epochs, resume=resume,
                                  finetune=finetune, threads=threads, progress=progress, device=dev)
    print_summary({"weights": summary["weights"], "chosen U-Net": summary["chosen_unet"], **dev.record(),
                   "wall seconds": summary["wall_s"],
                   **{f"val {k} AJI": (v.get("val") or {}).get("aji") for k, v in summary["candidates"].items()}},
                  as_json=json_summary, quiet=quiet, title="nucli train")


def _training_device(spec: str, name: str, supported: bool):
    """``--device`` for training: gensegnet and harunet train on a GPU; the others on the CPU only
    (``auto`` then means the CPU; naming a GPU is a usage error). Resolved before -o is created."""
    from nucli.parallel.device import CPU, resolve_device

    dev = resolve_device(spec)
    if dev.name == "cpu" or (supported and name in ("gensegnet", "harunet")):
        return dev
    if str(spec).strip().lower() != "auto":
        raise UsageError(f"--device {spec}: training '{name}' this way runs on the CPU only in this version "
                         "(gensegnet and harunet train on a GPU); use --device cpu")
    return CPU


def _is_multiset(items: list[Path]) -> bool:
    """Sets (DIR/train/images) or manifests rather than one DIR/images folder."""
    return any(Path(d).suffix.lower() == ".json" or (Path(d) / "train" / "images").is_dir() for d in items)


def _train_multi(name, data, output, init, steps, batch, stain_aug, resume, overwrite, threads, seed, quiet,
                 json_summary, lr=None, input_channels=None) -> None:
    from nucli.models.registry import get_spec
    from nucli.training import multiset as ms
    from nucli.training.multiset_train import train_multi

    sets = ms.parse_data_args(data)
    init = Path(init) if init is not None else get_spec(name).weights_path
    if init is None or not Path(init).is_file():
        raise InputError(f"--init {init}: weights file not found")
    if output.exists() and not output.is_dir():
        raise InputError(f"-o {output} exists and is not a folder")
    if output.exists() and any(output.iterdir()) and not (resume or overwrite):
        raise OutputExistsError(f"{output} is not empty; pass --resume to continue or --overwrite to start over")
    if overwrite and not resume and output.exists():
        for f in output.glob("*.ckpt.safetensors"):
            f.unlink()
    output.mkdir(parents=True, exist_ok=True)
    with _progress(quiet) as progress:
        report = (lambda s, n, parts: progress(name, s, n)) if progress else None
        summary = train_multi(name, sets, output, Path(init), steps=steps or 2000,
                              batch=batch or (6 if name == "gensegnet" else 4), stain_aug=stain_aug, seed=seed,
                              lr=lr or 2e-4, resume=resume, threads=threads, in_channels=input_channels,
                              progress=report)
    rows = {"weights": summary["weights"], "steps": summary["steps"], "best step": summary["best_step"],
            "wall seconds": summary["wall_s"]}
    rows.update({f"val {k} AJI": round(v["aji"], 4) for k, v in summary["val_crops"].items()})
    print_summary(rows, as_json=json_summary, quiet=quiet, title="nucli train")


class SynthMode(str, Enum):
    style = "style"


def _spatialprior_or_synth(name, data, output, images, prior_masks, scale, steps, synth, count, weights, preset,
                           resume, threads, seed, overwrite, quiet, json_summary) -> None:
    """--method spatialprior, --method synth (write pairs) and --synth style (nucli.training.spatialprior, nucli.synth)."""
    if name == "spatialprior":
        from nucli.training.spatialprior import train_from_options as train_spatialprior

        with _progress(quiet) as progress:
            s = train_spatialprior(images, prior_masks, output, preset=preset, steps=steps, scale=scale,
                                   resume=resume, threads=threads, seed=seed, progress=progress)
        print_summary({"weights": s["weights"], "steps": s["run"]["steps"], "selected step": s["run"]["best_step"],
                       "scale": s["scale"]["scale"], "wall seconds": s["wall_s"]},
                      as_json=json_summary, quiet=quiet, title="nucli train")
    elif name == "synth":
        from nucli.synth.train_cli import pairs_from_options

        with _progress(quiet) as progress:
            s = pairs_from_options(data, output, count, seed=seed, refiner=weights, overwrite=overwrite,
                                   progress=progress)
        print_summary({"output": s["output"], "pairs written": s["written"], "pairs kept": s["kept"],
                       "restyled": s["refined"]}, as_json=json_summary, quiet=quiet, title="nucli train")
    else:
        from nucli.synth.train_cli import style_from_options

        with _progress(quiet) as progress:
            s = style_from_options(name, data, output, preset=preset, steps=steps, resume=resume, threads=threads,
                                   seed=seed, progress=progress)
        print_summary({"weights": s["weights"], "stages": ", ".join(s["stages"]), "wall seconds": s["wall_s"]},
                      as_json=json_summary, quiet=quiet, title="nucli train")


class _progress:
    """One rich progress bar per training stage (count, rate, ETA); silent with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if self.quiet:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.bar.__enter__()
        return self

    def __call__(self, stage: str, step: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(f"train {stage}", total=total, completed=step - 1)
        self.bar.update(self.tasks[stage], completed=step)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
