"""HARU-Net ablation on a labelled split (CPU-sized version of the paper's Table 5).

Rows (all mean over images of the split, the published-table convention):

* ``harunet``            -- HARU-Net maps + Algorithm-1 post-processing (the method);
* ``harunet_no_growth``  -- same maps, instances = components of foreground x (1 - contour)
                            without growing them back (what contour subtraction alone gives);
* ``harunet_fg_watershed`` -- HARU-Net foreground map alone + distance-transform watershed
                            (the paper's post-processing for its other ablation rows),
                            watershed settings picked on ``--val``;
* ``baseline`` (optional) -- ``--baseline-method`` with ``--baseline-weights`` through
                            ``nucli.evaluation.evaluate_dataset`` (e.g. a plain U-Net + watershed).

Usage::

    python benchmarks/ablation_harunet.py --weights W --val DSB/val --test DSB/test \
        [--baseline-method gensegnet --baseline-weights U.safetensors] [--threads 2] [-o out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

KEYS = ("aji", "aji_plus", "pq", "dq", "sq", "dice", "f1")


def predict_split(method, folder: Path, limit: int | None = None):
    from nucli.evaluation.labels_io import read_raster, read_rgb
    from nucli.evaluation.runner import dataset_items

    items, _ = dataset_items(folder, limit=limit)
    out = []
    for it in items:
        image, true = read_rgb(it.image), read_raster(it.labels)
        maps = method.infer(image[None])[0].astype(np.float16)
        out.append((it.id, true, maps))
    return out


def score(rows, fn) -> dict[str, float]:
    from nucli.metrics import mean_metrics, score_image

    m = mean_metrics([score_image(true, fn(maps.astype(np.float32))) for _, true, maps in rows])
    return {k: round(float(m[k]), 4) for k in KEYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--test", type=Path, required=True)
    ap.add_argument("--baseline-method", default=None)
    ap.add_argument("--baseline-weights", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("-o", "--output", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from scipy import ndimage as ndi

    from nucli.models.harunet import maps_to_labels
    from nucli.models.harunet.postprocess import relabel
    from nucli.models.registry import build_method
    from nucli.postprocess import split_touching

    torch.set_num_threads(args.threads)
    method = build_method("harunet", weights=args.weights)
    p = dict(method.config.params)
    t0 = time.time()
    val = predict_split(method, args.val, args.limit)
    test = predict_split(method, args.test, args.limit)
    t_maps = time.time() - t0

    def no_growth(maps):
        fg = maps[0] > p["mask_threshold"]
        seeds, _ = ndi.label(fg & (maps[1] <= p["contour_threshold"]), structure=np.ones((3, 3)))
        return relabel(seeds, int(p["min_area"]))

    def fg_watershed(md, h):
        def fn(maps):
            return relabel(split_touching(maps[0] > p["mask_threshold"], md, h=h), int(p["min_area"]))
        return fn

    best_ws = max(itertools.product((4.0, 6.0, 8.0, 12.0), (0.5, 1.0, 2.0)),
                  key=lambda mh: (lambda m: m["aji"] + m["pq"])(score(val, fg_watershed(*mh))))
    rows = {
        "harunet": score(test, lambda maps: maps_to_labels(maps, p)),
        "harunet_no_growth": score(test, no_growth),
        "harunet_fg_watershed": score(test, fg_watershed(*best_ws)),
    }
    if args.baseline_method:
        from nucli.evaluation import evaluate_dataset

        rep = evaluate_dataset(args.test, args.baseline_method, weights=args.baseline_weights, limit=args.limit)
        from nucli.evaluation.report import MEAN_KEY

        mean = rep.aggregate[MEAN_KEY]
        rows["baseline"] = {k: round(float(mean[k]), 4) for k in KEYS if k in mean}
    out = {"test": str(args.test), "val": str(args.val), "weights": str(args.weights or "shipped"),
           "postprocess": {k: p[k] for k in ("mask_threshold", "contour_threshold", "min_area")},
           "fg_watershed_min_distance_h": best_ws, "seconds_predicting_maps": round(t_maps, 1), "rows": rows}
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
