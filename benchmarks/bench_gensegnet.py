"""Seconds per 512x512 tile for each GeNSeg-Net stage (enhancement, U-Net, post-processing).

    python benchmarks/bench_gensegnet.py [--weights W] [--threads 2] [--repeats 7] [--bf16/--no-bf16] [--channels-last]

Tiles come from the H&E slide and DSB2018 test images in ../shared/data when present
(real content matters for the watershed), else synthetic blobs. Prints one JSON object:
the median (and min) over repeats of each stage, per tile, for batch sizes 1 and 4, as
wall-clock seconds and as CPU seconds of this process (on a machine shared with other
jobs the wall time is inflated; with --threads 1 the CPU time is what the stage costs one
core, i.e. its wall time on an otherwise idle core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def real_tiles(n: int, size: int = 512) -> np.ndarray:
    tiles = []
    slide = DATA / "slides" / "CMU-1-Small-Region.svs"
    if slide.exists():
        import tifffile

        img = tifffile.imread(slide)  # 2967 x 2220 RGB, small enough to read whole
        for y, x in [(1000, 800), (1500, 1200), (400, 600), (2000, 300)]:
            tiles.append(img[y:y + size, x:x + size, :3])
    test = DATA / "dsb2018" / "test" / "images"
    if test.is_dir():
        from PIL import Image

        for p in sorted(test.glob("*.png")):
            a = np.asarray(Image.open(p))
            a = np.repeat(a[..., None], 3, 2) if a.ndim == 2 else a[..., :3]
            if a.shape[0] >= size and a.shape[1] >= size:
                tiles.append(a[:size, :size])
            if len(tiles) >= 2 * n:
                break
    if not tiles:
        from skimage.draw import disk

        rng = np.random.default_rng(0)
        for _ in range(n):
            t = np.full((size, size, 3), 230, np.uint8)
            for _ in range(120):
                rr, cc = disk(tuple(rng.integers(10, size - 10, 2)), int(rng.integers(5, 12)), shape=(size, size))
                t[rr, cc] = (90, 60, 140)
            tiles.append(t)
    return np.stack(tiles[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="force bfloat16 autocast on/off (default: the weights' setting, 'auto')")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from nucli.models.registry import build_method

    method = build_method("gensegnet", weights=args.weights)
    if args.bf16 is not None:
        method.bf16 = args.bf16
    if args.channels_last:
        method.generator.to(memory_format=torch.channels_last)
        method.unet.to(memory_format=torch.channels_last)
    tiles = real_tiles(max(args.batch))
    result = {"threads": args.threads, "load_average": [round(x, 2) for x in os.getloadavg()], "bf16": method.bf16, "channels_last": args.channels_last,
              "torch": torch.__version__, "tile": list(tiles.shape[1:3]), "per_tile_seconds": {}}
    for b in args.batch:
        batch = tiles[:b]
        method.segment(batch)  # warm-up
        stages = ("enhance", "unet", "postprocess", "total")
        wall: dict[str, list[float]] = {k: [] for k in stages}
        cpu: dict[str, list[float]] = {k: [] for k in stages}
        for _ in range(args.repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            e = method.enhance(batch)
            w1, c1 = time.perf_counter(), time.process_time()
            p = method.classify(e)
            w2, c2 = time.perf_counter(), time.process_time()
            method.postprocess(p)
            w3, c3 = time.perf_counter(), time.process_time()
            for k, wv, cv in zip(stages, (w1 - w0, w2 - w1, w3 - w2, w3 - w0), (c1 - c0, c2 - c1, c3 - c2, c3 - c0)):
                wall[k].append(wv / b)
                cpu[k].append(cv / b)
        result["per_tile_seconds"][f"batch{b}"] = {
            k: {"wall_median": round(statistics.median(wall[k]), 4), "wall_min": round(min(wall[k]), 4),
                "cpu_median": round(statistics.median(cpu[k]), 4)} for k in stages}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
