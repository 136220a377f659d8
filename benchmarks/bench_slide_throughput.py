"""Whole-slide throughput (megapixels of tissue per second) and peak memory on generated pyramidal
slides of growing size: the memory must stay flat.

    python benchmarks/bench_slide_throughput.py [--sizes 10000 20000 40000] [--method gensegnet]
        [--slides DIR] [--threads 2] [--workers N] [--json results.json]

Each slide (square, 0.5 um/px, JPEG, three tissue islands covering ~4 % of the area, made by
``nucli.synthetic.write_synthetic_slide`` and kept in --slides for reuse) is processed end to end
(tile -> segment -> stitch -> GeoJSON + CSV) in its own subprocess, which reports its wall time per
step, its CPU seconds (all threads, and any Dask worker processes it started: on a machine shared
with other work the wall time grows with the load, the CPU time hardly does) and its peak resident
memory (``ru_maxrss`` of itself and of its worker processes). Tissue megapixels are the islands' exact area at level 0. GeNSeg-Net without shipped weights
runs its untrained network (labelled in the output).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import hardware, load, untrained_gensegnet_weights  # noqa: E402

N_ISLANDS = 3


def make_slide(folder: Path, size: int, seed: int = 1) -> tuple[Path, float]:
    """The slide of ``size`` x ``size`` px (made once) and its tissue area in level-0 megapixels."""
    from nucli.synthetic import make_tissue, write_synthetic_slide

    path = folder / f"synthetic_{size}.svs"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        write_synthetic_slide(path, size, size, n_islands=N_ISLANDS, seed=seed, mpp=0.5)
        print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    tissue = make_tissue(size, size, N_ISLANDS, seed=seed)
    area = sum(math.pi * isl.rx * isl.ry for isl in tissue.islands)
    return path, area / 1e6


def run_one(args: argparse.Namespace) -> None:
    """The child: one slide end to end; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from nucli.export import resolve_outputs
    from nucli.models.registry import build_method
    from nucli.parallel import MethodRecipe, make_runner
    from nucli.pipeline import segment_store, stitch_to_outputs
    from nucli.tiling.tiler import tile_slide

    method = build_method(args.method, weights=args.weights)
    rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = args.out
    times = {}
    t0 = time.perf_counter()
    store = tile_slide(args.one, out / "run.zarr", method=args.method, progress=False)
    times["tile"] = time.perf_counter() - t0
    with make_runner(workers=args.workers) as runner:
        recipe = MethodRecipe.create(args.method, args.weights) if runner.is_dask else None
        t1 = time.perf_counter()
        segment_store(store, method, progress=False, runner=runner, recipe=recipe)
        times["segment"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    summary = stitch_to_outputs(store, resolve_outputs(out / "nuclei.geojson", ["csv"]), progress=False)
    times["stitch_export"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    print(json.dumps({
        "cpu_seconds": round(cpu, 1),
        "tiles": store.n_tiles, "nuclei": summary["nuclei"], "tissue_area_mm2": summary["tissue_area_mm2"],
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_model_build_mb": round(rss_ready, 1),
        "peak_rss_workers_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "geojson_mb": round((out / "nuclei.geojson").stat().st_size / 2**20, 1),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000, 40_000])
    ap.add_argument("--method", default="gensegnet")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--slides", type=Path, default=Path(tempfile.gettempdir()) / "nucli-bench-slides")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--workers", type=int, default=None, help="Dask local workers (default: serial)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        run_one(args)
        return

    from nucli.errors import WeightsError
    from nucli.models.registry import build_method

    note = None
    weights = args.weights
    if weights is None:
        try:
            build_method(args.method)
        except WeightsError:
            if args.method != "gensegnet":
                raise
            weights = untrained_gensegnet_weights(args.slides / "gensegnet_untrained.safetensors")
            note = "UNTRAINED network of the shipped preset (weights not shipped yet); speed only"
    result = {"hardware": hardware(), "method": args.method, "note": note, "threads": args.threads,
              "workers": args.workers, "slides": []}
    for size in args.sizes:
        slide, tissue_mpx = make_slide(args.slides, size)
        with tempfile.TemporaryDirectory(prefix="nucli-thr-") as tmp:
            cmd = [sys.executable, __file__, "--one", str(slide), "--out", tmp, "--method", args.method,
                   "--threads", str(args.threads)]
            if weights is not None:
                cmd += ["--weights", str(weights)]
            if args.workers:
                cmd += ["--workers", str(args.workers)]
            before = load()
            print(f"{size}^2: running ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{size}^2 failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update({"size": size, "tissue_megapixels": round(tissue_mpx, 2),
                    "tissue_megapixels_per_s": round(tissue_mpx / row["seconds"]["total"], 3),
                    "seconds_per_tile": round(row["seconds"]["total"] / max(row["tiles"], 1), 3),
                    "cpu_seconds_per_tile": round(row["cpu_seconds"] / max(row["tiles"], 1), 3),
                    "tissue_megapixels_per_cpu_s": round(tissue_mpx / row["cpu_seconds"], 3),
                    "load_before": before, "load_after": load()})
        print(json.dumps(row), file=sys.stderr, flush=True)
        result["slides"].append(row)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    lines = ["| slide | tissue Mpx | tiles | nuclei | wall s | tissue Mpx/s | s/tile | CPU s/tile | peak RSS MB | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["slides"]:
        lines.append(f"| {r['size']}² | {r['tissue_megapixels']} | {r['tiles']} | {r['nuclei']} | "
                     f"{r['seconds']['total']} | {r['tissue_megapixels_per_s']} | {r['seconds_per_tile']} | "
                     f"{r['cpu_seconds_per_tile']} | {max(r['peak_rss_mb'], r['peak_rss_workers_mb'])} | "
                     f"{r['load_before'][0]} |")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
