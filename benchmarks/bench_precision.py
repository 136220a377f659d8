"""How much bfloat16 changes a method's nuclei: the same inputs in float32 and in bf16, on the CPU.

    python benchmarks/bench_precision.py [--methods gensegnet harunet]
        [--datasets ../shared/data/dsb2018/test ../shared/data/monuseg/val]
        [--slide ../shared/data/slides/CMU-1-Small-Region.svs] [--threads 1] [--limit N] [--json out.json]

A stand-in for "how much may results differ between devices" while no GPU measurement exists: on a
CUDA GPU nucli runs the networks under autocast in bf16 (or fp16), on the CPU in float32 or, on
CPUs with native bfloat16 (AVX-512 BF16 / AMX), under bf16 autocast (the methods' ``bf16: "auto"``).
``--precision`` changes nothing on the CPU, so this script sets the built method's own CPU switch
(``method.bf16``) to False (fp32) or True (bf16) and runs, per method:

* each ``--dataset`` through ``nucli evaluate``'s code (``evaluate_dataset``, default settings):
  mean AJI / PQ / F1 against the ground truth in each precision, and the agreement of the two
  predictions with each other (F1 of nuclei matched at IoU > 0.5, AJI of bf16 against fp32);
* ``--slide`` end to end (``nucli segment``'s code: tile, segment, stitch, GeoJSON) in each
  precision, and the F1 at IoU 0.5 between the two GeoJSONs (``bench_device.f1_at_iou``, the
  measure ``bench_device.py`` reports between a GPU and the CPU).

bf16 on the CPU is not bit-for-bit what a GPU computes in bf16 (other kernels, other summation
orders), so this bounds the size of the effect, not its exact value on a given GPU;
``benchmarks/bench_device.py --device cuda`` measures that.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, hardware  # noqa: E402
from bench_device import f1_at_iou, outlines  # noqa: E402

MODES = ("fp32", "bf16")


@contextmanager
def cpu_precision(mode: str):
    """Every method built inside runs its networks in ``mode`` on the CPU."""
    import nucli.parallel.device as device

    original = device.build_on_device

    def build(*args, **kwargs):
        m = original(*args, **kwargs)
        if not hasattr(m, "bf16") or getattr(m, "amp_dtype", None) is not None:
            raise SystemExit(f"{m.name}: no CPU bf16 switch, or not on the CPU")
        m.bf16 = mode == "bf16"
        return m

    device.build_on_device = build
    try:
        yield
    finally:
        device.build_on_device = original


def weights_sha(method: str) -> str | None:
    from nucli.models.registry import get_spec

    path = get_spec(method).weights_path
    if path is None or not Path(path).exists():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def on_dataset(method: str, dataset: Path, work: Path, limit: int | None) -> dict:
    import numpy as np

    from nucli.evaluation.labels_io import read_raster
    from nucli.evaluation.runner import evaluate_dataset
    from nucli.metrics import mean_metrics, pooled_metrics, score_image

    row: dict = {"method": method, "dataset": str(dataset)}
    preds = {}
    for mode in MODES:
        folder = work / f"{method}_{dataset.parent.name}_{dataset.name}_{mode}"
        t0 = time.perf_counter()
        with cpu_precision(mode):
            report = evaluate_dataset(dataset, method, limit=limit, save_predictions=folder, overwrite=True)
        agg = report.aggregate
        mean = agg["mean_over_images"]
        row[mode] = {"images": agg["n_images"], "nuclei": agg["n_pred"], "seconds": round(time.perf_counter() - t0, 1),
                     **{k: round(mean[k], 4) for k in ("aji", "aji_plus", "pq", "f1", "dice")}}
        preds[mode] = folder
    agree = []
    for f in sorted(preds["fp32"].glob("*.tif")):
        a = np.asarray(read_raster(f))
        b = np.asarray(read_raster(preds["bf16"] / f.name))
        agree.append(score_image(a, b))
    pooled, mean = pooled_metrics(agree), mean_metrics(agree)
    row["bf16_vs_fp32"] = {"f1_iou50_pooled": round(pooled["f1"], 4), "f1_iou50_mean": round(mean["f1"], 4),
                           "aji_mean": round(mean["aji"], 4),
                           "identical_images": sum(c.fp == 0 and c.fn == 0 and c.iou_sum == c.tp for c in agree),
                           "images": len(agree)}
    row["delta_bf16_minus_fp32"] = {k: round(row["bf16"][k] - row["fp32"][k], 4) for k in ("aji", "pq", "f1")}
    return row


def on_slide(method: str, slide: Path, work: Path) -> dict:
    from nucli.pipeline import segment_to_outputs

    row: dict = {"method": method, "slide": str(slide)}
    paths = {}
    for mode in MODES:
        out = work / f"{method}_slide_{mode}.geojson"
        t0 = time.perf_counter()
        with cpu_precision(mode):
            summary = segment_to_outputs(slide, out, method=method, store=out.with_suffix(".zarr"), device="cpu",
                                         progress=False, overwrite=True)
        row[mode] = {"tiles": summary["tiles"], "nuclei": summary["nuclei"],
                     "seconds": round(time.perf_counter() - t0, 1)}
        paths[mode] = out
    row["bf16_vs_fp32"] = {"f1_iou50": round(f1_at_iou(outlines(paths["fp32"]), outlines(paths["bf16"])), 4),
                           "same_bytes": paths["fp32"].read_bytes() == paths["bf16"].read_bytes()}
    return row


def main() -> None:
    data = ROOT.parent / "shared" / "data"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["gensegnet", "harunet"])
    ap.add_argument("--datasets", nargs="*", type=Path,
                    default=[data / "dsb2018" / "test", data / "monuseg" / "val"])
    ap.add_argument("--slide", type=Path, default=data / "slides" / "CMU-1-Small-Region.svs",
                    help="segmented end to end in both precisions ('' to skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images of each set")
    ap.add_argument("--work", type=Path, default=None, help="folder for the outputs (default: a new temp folder)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="nucli-bench-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"hardware": hardware(), "threads": args.threads,
               "cpu_native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
               "weights_sha256": {m: weights_sha(m) for m in args.methods}, "datasets": [], "slides": []}
    for method in args.methods:
        for dataset in args.datasets:
            row = on_dataset(method, dataset, work, args.limit)
            results["datasets"].append(row)
            print(json.dumps(row), flush=True)
        if str(args.slide) not in ("", "."):
            row = on_slide(method, args.slide, work)
            results["slides"].append(row)
            print(json.dumps(row), flush=True)
    results["load_1_5_15_after"] = [round(v, 2) for v in os.getloadavg()]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
