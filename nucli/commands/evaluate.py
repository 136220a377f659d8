"""`nucli evaluate`: score predicted nuclei against ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nucli.commands._common import handle_errors, interrupt_hint, stderr, stdout
from nucli.commands._options import Device, JsonSummary, Method, Overwrite, Precision, Quiet, Tta, Weights
from nucli.errors import UsageError

PredArg = Annotated[
    Optional[Path],
    typer.Argument(
        help="Predictions: a label image (.tif/.png/.npy), a Zarr label image, a GeoJSON file, "
        "or a folder of these (matched to GT by file name).",
        show_default=False,
    ),
]
GtArg = Annotated[
    Optional[Path],
    typer.Argument(help="Ground truth, in the same forms as PRED.", show_default=False),
]


@handle_errors
@interrupt_hint("No report was written; rerun the same command to score again.")
def run(
    pred: PredArg = None,
    gt: GtArg = None,
    dataset: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--dataset",
            help="Run --method over DIR/images/*.png and score against DIR/labels/<id>.tif "
            "(instead of PRED GT). Repeat for several sets: one row per set and the mean over sets.",
        ),
    ] = None,
    method: Method = None,
    weights: Weights = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="--dataset: only the first N images.")] = None,
    modality: Annotated[
        Optional[str],
        typer.Option("--modality", help="--dataset: only images of this modality (from index.json)."),
    ] = None,
    save_predictions: Annotated[
        Optional[Path],
        typer.Option("--save-predictions", help="--dataset: also write each prediction to DIR/<id>.tif."),
    ] = None,
    mpp: Annotated[
        Optional[str],
        typer.Option("--mpp", help="--dataset: 'auto' zooms each image without a pixel size until its nuclei have the "
                     "size the method was trained on (the default for weights trained at one working scale; see "
                     "`nucli segment --help`); 'native': every such image at its own resolution.",
                     metavar="auto|native"),
    ] = None,
    device: Device = "auto",
    precision: Precision = None,
    tta: Tta = False,
    per_image: Annotated[bool, typer.Option("--per-image", help="Show a row per image in the table.")] = False,
    output: Annotated[
        Optional[Path], typer.Option("-o", "--output", help="Write the full report (per image + aggregates) as JSON.")
    ] = None,
    csv_path: Annotated[
        Optional[Path], typer.Option("--csv", help="Write the per-image metrics as CSV to this file.")
    ] = None,
    allow_missing: Annotated[
        bool,
        typer.Option("--allow-missing", help="Score only images present on both sides instead of failing."),
    ] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_summary: JsonSummary = False,
) -> None:
    """Score predicted nuclei against ground truth: AJI, AJI+, Dice, DQ/SQ/PQ, precision/recall/F1.

    Either [bold]nucli evaluate PRED GT[/] (files or folders) or [bold]nucli evaluate --dataset DIR --method NAME[/]. The aggregate is shown as the mean over images (as in published tables) and pooled over all nuclei. [bold]-o[/] writes the full report as JSON.

    Examples:

      A folder of predictions against ground truth, matched by file name:
      nucli evaluate preds/ dsb2018/test/labels/ --per-image

      The same, saving the full report and the per-image metrics:
      nucli evaluate preds/ gts/ -o scores.json --csv scores.csv

      Run HARU-Net over a data set (images/ + labels/) and score it:
      nucli evaluate --dataset dsb2018/test --method harunet

      The default method, enlarging images of small nuclei first:
      nucli evaluate --dataset dsb2018/test --mpp auto

      One row per set and the mean over sets:
      nucli evaluate --dataset monuseg/val --dataset dsb2018/test

      A quick check on the first 10 images:
      nucli evaluate --dataset dsb2018/test --method watershed --limit 10
    """
    from nucli.autoscale import parse_mpp
    from nucli.evaluation import evaluate_dataset, evaluate_paths

    datasets = list(dataset or [])
    dataset = datasets[0] if datasets else None
    if len(datasets) > 1 and save_predictions is not None:
        raise UsageError("--save-predictions takes one --dataset at a time")
    if dataset is not None and (pred is not None or gt is not None):
        raise UsageError("give either PRED GT or --dataset DIR, not both")
    if dataset is None:
        if pred is None or gt is None:
            raise UsageError("give PRED and GT (files or folders), or --dataset DIR --method NAME")
        dataset_only = {
            "--method": method, "--weights": weights, "--limit": limit,
            "--modality": modality, "--save-predictions": save_predictions, "--mpp": mpp,
            "--precision": precision, "--tta": tta or None,
        }
        used = [name for name, value in dataset_only.items() if value is not None]
        if used:
            raise UsageError(f"{', '.join(used)} only apply with --dataset")
    from nucli.outputs import check_replaceable, refuse_inputs

    refuse_inputs([("-o", output), ("--csv", csv_path), ("--save-predictions", save_predictions)],
                  [("the predictions", pred), ("the ground truth", gt),
                   *[("the data set", d) for d in datasets],
                   ("the weights", weights)])
    for path in (output, csv_path):
        if path is not None:
            check_replaceable(path, overwrite)
    if output is not None and csv_path is not None and output.resolve() == csv_path.resolve():
        raise UsageError("-o/--output and --csv must be different files")

    show_progress = not (quiet or json_summary)
    if len(datasets) > 1:
        from nucli.evaluation.report import MultiSetReport

        reports = []
        for d in datasets:
            with _Progress(show_progress) as progress:
                reports.append(evaluate_dataset(d, method, weights=weights, limit=limit, modality=modality,
                                                allow_missing=allow_missing, on_image=progress.update,
                                                mpp=parse_mpp(mpp), device=device, precision=precision,
                                                tta=tta or None))
        _finish(MultiSetReport(reports), output, csv_path, json_summary, quiet, per_image)
        return
    with _Progress(show_progress) as progress:
        if dataset is not None:
            report = evaluate_dataset(
                dataset,
                method,
                weights=weights,
                limit=limit,
                modality=modality,
                save_predictions=save_predictions,
                overwrite=overwrite,
                allow_missing=allow_missing,
                on_image=progress.update,
                mpp=parse_mpp(mpp),
                device=device,
                precision=precision,
                tta=tta or None,
            )
        else:
            report = evaluate_paths(pred, gt, allow_missing=allow_missing, on_image=progress.update)

    data = _write_outputs(report, output, csv_path, json_summary)
    if not json_summary and not quiet:
        _print_table(report, per_image)
        if report.skipped:
            stderr().print(
                f"[yellow]Skipped {len(report.skipped)} image(s) without a counterpart.[/]", highlight=False
            )


def _write_outputs(report: Any, output: Optional[Path], csv_path: Optional[Path], json_summary: bool) -> dict:
    """A report (one set or several): -o JSON and --csv written atomically, --json printed; its dict."""
    import json
    import sys

    from nucli.evaluation.labels_io import write_text_atomic

    data = report.to_dict()
    if output is not None:
        write_text_atomic(json.dumps(data, indent=2, default=str) + "\n", output)
    if csv_path is not None:
        write_text_atomic(report.to_csv(), csv_path)
    if json_summary:
        sys.stdout.write(json.dumps(data, default=str) + "\n")
    return data


def _finish(multi: Any, output: Optional[Path], csv_path: Optional[Path], json_summary: bool, quiet: bool,
            per_image: bool) -> None:
    """Several sets: write -o / --csv, print JSON or one row per set plus the mean over sets."""
    from nucli.evaluation.report import MEAN_KEY

    data = _write_outputs(multi, output, csv_path, json_summary)
    if json_summary or quiet:
        return
    if per_image:
        for r in multi.reports:
            _print_table(r, True)
    from rich import box
    from rich.table import Table

    from nucli.metrics import METRIC_TITLES

    cols = multi.SET_METRICS
    table = Table(title=f"nucli evaluate: method {data.get('method')}, mean over images of each set",
                  title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("set", no_wrap=True)
    table.add_column("images", justify="right")
    for m in cols:
        table.add_column(METRIC_TITLES[m], justify="right")
    for name, agg in multi.rows():
        table.add_row(name, str(agg["n_images"]), *[f"{agg[MEAN_KEY][m]:.4f}" for m in cols])
    table.add_section()
    mean = multi.mean_over_sets()
    table.add_row("mean over sets", str(sum(a["n_images"] for _, a in multi.rows())),
                  *[f"{mean[m]:.4f}" for m in cols])
    stdout().print(table)


class _Progress:
    """A rich progress bar (count, rate, ETA) on stderr, or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]scoring[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=stderr(),
                transient=True,
            )
            self._progress.__enter__()
        return self

    def update(self, done: int, total: int, name: str) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task("scoring", total=total, rate="")
        self._progress.update(self._task, completed=done)
        speed = self._progress.tasks[0].speed
        self._progress.update(self._task, rate=f"{speed:.2f} img/s" if speed else "")

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def _print_table(report: Any, per_image: bool) -> None:
    from rich import box
    from rich.table import Table

    from nucli.evaluation.report import MEAN_KEY, POOLED_KEY
    from nucli.metrics import METRIC_TITLES, METRICS

    out = stdout()
    if per_image:
        cols = ["aji", "aji_plus", "dice", "dq", "sq", "pq", "f1"]
        timed = report.timing() is not None
        table = Table(title="per image", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
        table.add_column("image", overflow="ellipsis", no_wrap=True, max_width=16)
        table.add_column("GT", justify="right", no_wrap=True)
        table.add_column("pred", justify="right", no_wrap=True, min_width=4)
        for name in cols:
            table.add_column(METRIC_TITLES[name], justify="right", no_wrap=True, min_width=5)
        if timed:
            table.add_column("s/MP", justify="right", no_wrap=True, min_width=4)
        for r in report.rows:
            d = r.to_dict()
            cells = [r.name, str(r.counts.n_true), str(r.counts.n_pred)] + [f"{d[m]:.3f}" for m in cols]
            if timed:
                spm = d.get("seconds_per_megapixel")
                cells.append(f"{spm:.2f}" if spm is not None else "")
            table.add_row(*cells)
        out.print(table)

    agg = report.aggregate
    title = "nucli evaluate"
    if report.info.get("method"):
        title += f": method {report.info['method']}"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("metric", no_wrap=True)
    table.add_column("mean over images", justify="right")
    table.add_column("pooled over nuclei", justify="right")
    for name in METRICS:
        table.add_row(METRIC_TITLES[name], f"{agg[MEAN_KEY][name]:.4f}", f"{agg[POOLED_KEY][name]:.4f}")
    table.add_section()
    for key, label in (("n_images", "images"), ("n_true", "nuclei GT"), ("n_pred", "nuclei pred")):
        table.add_row(label, str(agg[key]), str(agg[key]))
    out.print(table)

    by_mod = report.by_modality()
    if len(by_mod) > 1:
        cols = ["aji", "aji_plus", "dice", "dq", "sq", "pq", "f1"]
        table = Table(
            title="mean over images, by modality", title_justify="left", box=box.SIMPLE_HEAD,
            pad_edge=False, padding=(0, 1), collapse_padding=True,
        )
        table.add_column("modality", no_wrap=True)
        table.add_column("images", justify="right", no_wrap=True)
        for name in cols:
            table.add_column(METRIC_TITLES[name], justify="right", no_wrap=True, min_width=5)
        for mod, a in by_mod.items():
            table.add_row(mod, str(a["n_images"]), *[f"{a[MEAN_KEY][m]:.3f}" for m in cols])
        out.print(table)
    timing = report.timing()
    if timing:
        out.print(
            f"method run time: {timing['seconds']:.2f} s for {timing['megapixels']:.2f} MP "
            f"= {timing['seconds_per_megapixel']:.3f} s/MP",
            highlight=False,
        )
