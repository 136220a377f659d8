"""HARU-Net speed: seconds per 512x512 tile (network, post-processing, total).

Usage::

    python benchmarks/bench_harunet.py [--weights W] [--threads 2] [--runs 7] [--image PNG] [--json]

The tile is a 512x512 crop of a real image when ``--image`` is given (e.g. a
DSB2018 test image or a region of the CMU slide), otherwise a synthetic field
of bright blobs. Reports the median of ``--runs`` timed runs after one warm-up,
with the machine's load average so contended numbers can be recognised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np


def synthetic_tile(size: int = 512, seed: int = 0) -> np.ndarray:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float32)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(220):
        r, c, rad = rng.integers(0, size), rng.integers(0, size), rng.uniform(5, 12)
        img[(yy - r) ** 2 + (xx - c) ** 2 <= rad**2] = rng.uniform(0.5, 1.0)
    img = ndi.gaussian_filter(img, 1.0) + rng.normal(0, 0.04, img.shape)
    gray = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def load_tile(path: Path, size: int = 512) -> np.ndarray:
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    h, w = img.shape[:2]
    if h < size or w < size:
        img = np.pad(img, ((0, max(size - h, 0)), (0, max(size - w, 0)), (0, 0)), mode="reflect")
    return np.ascontiguousarray(img[:size, :size])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--image", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from nucli.models.registry import build_method

    method = build_method("harunet", weights=args.weights)
    tile = load_tile(args.image, args.size) if args.image else synthetic_tile(args.size)
    batch = tile[None]
    method.postprocess(method.infer(batch))  # warm-up
    t_net, t_post, n_inst = [], [], 0
    for _ in range(args.runs):
        t0 = time.perf_counter()
        maps = method.infer(batch)
        t1 = time.perf_counter()
        res = method.postprocess(maps)
        t2 = time.perf_counter()
        t_net.append(t1 - t0)
        t_post.append(t2 - t1)
        n_inst = int(res[0].labels.max())
    total = [a + b for a, b in zip(t_net, t_post)]
    out = {
        "tile": f"{args.size}x{args.size}",
        "source": str(args.image) if args.image else "synthetic",
        "threads": args.threads,
        "runs": args.runs,
        "preset": method.config.params.get("preset"),
        "median_s_network": round(statistics.median(t_net), 4),
        "median_s_postprocess": round(statistics.median(t_post), 4),
        "median_s_total": round(statistics.median(total), 4),
        "min_s_total": round(min(total), 4),
        "instances": n_inst,
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>22}: {v}")


if __name__ == "__main__":
    main()
