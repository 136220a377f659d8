"""Time `nucli.metrics` on synthetic crowded images.

Default workload: 100 image pairs of 1000x1000 px with ~500 nuclei each
(GT = random ellipses; prediction = GT shifted by a few pixels, ids permuted,
10% of nuclei dropped, some merged, plus false positives). Reports the median
over ``--repeats`` runs of scoring all images (contingency table, AJI, AJI+,
PQ, F1, Dice), excluding data generation.

    python benchmarks/bench_metrics.py [--n-images 100] [--size 1000] [--nuclei 500] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def synthetic_pair(rng: np.random.Generator, size: int, nuclei: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[-14:15, -14:15]
    gt = np.zeros((size, size), dtype=np.uint16)
    for k in range(1, nuclei + 1):
        ry, rx = rng.uniform(5, 13, 2)
        theta = rng.uniform(0, np.pi)
        c, s = np.cos(theta), np.sin(theta)
        inside = ((c * yy + s * xx) / ry) ** 2 + ((-s * yy + c * xx) / rx) ** 2 <= 1
        y, x = rng.integers(14, size - 15, 2)
        gt[y - 14 : y + 15, x - 14 : x + 15][inside] = k  # later nuclei overwrite: touching/occluded
    pred = np.roll(gt, tuple(rng.integers(-3, 4, 2)), axis=(0, 1)).astype(np.int32)
    perm = np.concatenate([[0], rng.permutation(nuclei) + 1])
    drop = rng.random(nuclei + 1) < 0.1
    perm[drop] = 0
    perm[0] = 0
    merge = np.flatnonzero(rng.random(nuclei + 1) < 0.05)
    perm[merge] = perm[np.maximum(merge - 1, 0)]
    pred = perm[pred]
    for k in range(nuclei // 20):  # false positives
        y, x = rng.integers(0, size - 10, 2)
        pred[y : y + 9, x : x + 9] = 10_000 + k
    return gt, pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=100)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--nuclei", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from nucli.metrics import mean_metrics, pooled_metrics, score_image

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    pairs = [synthetic_pair(rng, args.size, args.nuclei) for _ in range(args.n_images)]
    gen_s = time.perf_counter() - t0

    times = []
    counts = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        counts = [score_image(gt, pred) for gt, pred in pairs]
        times.append(time.perf_counter() - t0)
    result = {
        "n_images": args.n_images,
        "size": args.size,
        "nuclei_per_image": args.nuclei,
        "repeats": args.repeats,
        "generation_s": round(gen_s, 2),
        "median_s_all_images": round(statistics.median(times), 3),
        "min_s_all_images": round(min(times), 3),
        "median_ms_per_image": round(1000 * statistics.median(times) / args.n_images, 2),
        "mean_metrics": {k: round(v, 4) for k, v in mean_metrics(counts).items()},
        "pooled_metrics": {k: round(v, 4) for k, v in pooled_metrics(counts).items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
