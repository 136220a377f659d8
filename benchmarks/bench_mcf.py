"""MCF benchmarks: detection speed on a 512x512 tile, and (optionally) accuracy with/without the segmentation branch.

Speed: a bank of ``--n`` templates (drawn from a labelled set when available,
else synthetic discs), one 512x512 tile; the first call (which also computes
the filters' spectra for this tile size) is reported apart, then the median of
``--runs`` calls, with a breakdown (features, FFT correlation + fusion,
upsampling + normalisation, gradient-direction centres).

    python benchmarks/bench_mcf.py                       # speed, 1 thread
    python benchmarks/bench_mcf.py --threads 2 --runs 9
    python benchmarks/bench_mcf.py --weights W --dataset ../shared/data/dsb2018/test   # + '-seg.' ablation

Accuracy: ``--weights`` (a trained mcf file) is scored on ``--dataset`` as it
is and as the detection branch alone (the same bank without the U-Net), both
through the same scorer as ``nucli evaluate``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "dsb2018"


CPU_TIMES: dict[str, float] = {}


def _timed(fn, runs: int, name: str = "") -> tuple[float, object]:
    """Median wall time of ``runs`` calls (the median CPU time of this process goes to CPU_TIMES[name])."""
    times, cpu, out = [], [], None
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if name:
        CPU_TIMES[name] = round(statistics.median(cpu), 4)
    return statistics.median(times), out


def synthetic_tile(size: int = 512, seed: int = 0) -> np.ndarray:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size), np.float32)
    for _ in range(120):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, 12)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(120, 230)
    img = ndi.gaussian_filter(img, 1.0) + rng.normal(20, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def bench_speed(n: int, runs: int, seed: int) -> dict:
    from nucli.models.mcf import templates as tp
    from nucli.models.mcf.bank import Bank
    from nucli.models.mcf.centres import centres_from_response
    from nucli.models.mcf.features import features, prepare

    if (DATA / "train").is_dir():
        templates = tp.from_labels(DATA / "train", n=n, seed=seed)
        from nucli.training.data import list_pairs, read_pair

        big = [p for p in list_pairs(DATA / "val") if read_pair(*p)[0].shape[0] >= 512]
        img = read_pair(*big[0])[0][:512, :512] if big else synthetic_tile()
        source = "dsb2018 (templates from train, tile from val)"
    else:
        tile = synthetic_tile(seed=seed + 1)
        templates = [tp.Template(tp.cut_window(prepare(tile), 256, 256, 16.0), 16.0, "synthetic")] * n
        img, source = synthetic_tile(), "synthetic"
    t0 = time.perf_counter()
    bank = Bank.build(templates)
    build_s = time.perf_counter() - t0
    det = bank.detector
    p = det.params
    prep = prepare(img)
    cold, _ = _timed(lambda: det.detect(prep), 1, "first_call")
    total, result = _timed(lambda: det.detect(prep), runs, "detect")
    prep_s, _ = _timed(lambda: prepare(img), runs, "prepare")
    feat_s, feats = _timed(lambda: features(prep, cell=p.cell, **p.feat_kw), runs, "features")
    fuse_s, _ = _timed(lambda: det.fused_cells(feats), runs, "fft_correlation_and_fusion")
    norm_s, s_map = _timed(lambda: det.response(prep)[0], runs, "features+fusion+upsample+normalise")
    cent_s, _ = _timed(lambda: centres_from_response(s_map, p.p, p.q, p.min_response), runs,
                       "gradient_direction_centres")
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "source": source, "tile": list(img.shape), "templates": len(templates),
        "filters": {"scales": p.k, "crops": len(p.crops), "T": p.t, "H": p.h, "kernels": len(det.kernels),
                    "fast_path": det.fast, "feature_channels": int(feats.shape[0]), "cell_px": p.cell},
        "bank_build_s": round(build_s, 3),
        "first_call_s": round(cold, 3),
        "detect_median_s": round(total, 4),
        "breakdown_median_s": {"prepare": round(prep_s, 4), "features": round(feat_s, 4),
                               "fft_correlation_and_fusion": round(fuse_s, 4),
                               "features+fusion+upsample+normalise": round(norm_s, 4),
                               "gradient_direction_centres": round(cent_s, 4)},
        "cpu_median_s": dict(CPU_TIMES),
        "centres_found": int(len(result.centres)), "runs": runs,
        "load_average_1min": load,
        "note": "wall times include waiting for the CPU on a shared machine; cpu_median_s is this process's CPU time",
    }


def bench_accuracy(weights: Path, dataset: Path, limit: int | None) -> dict:
    from nucli.evaluation import evaluate_dataset
    from nucli.models.mcf.method import export_detection_only

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        det_w = export_detection_only(weights, Path(tmp) / "det.safetensors")
        for name, w in (("full", weights), ("detection_only", det_w)):
            rep = evaluate_dataset(dataset, "mcf", weights=w, limit=limit).to_dict()
            agg = rep["aggregate"]
            out[name] = {k: {m: round(v[m], 4) for m in ("aji", "aji_plus", "dice", "pq", "precision", "recall", "f1")}
                         for k, v in agg.items() if isinstance(v, dict) and "aji" in v}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10, help="templates")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=Path, help="trained mcf weights: also score full vs detection-only")
    ap.add_argument("--dataset", type=Path, default=DATA / "test")
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "speed": bench_speed(args.n, args.runs, args.seed)}
    if args.weights is not None:
        report["accuracy"] = bench_accuracy(args.weights, args.dataset, args.limit)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
