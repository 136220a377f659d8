"""Replay the ``--mpp auto`` zoom search of weights trained at one working scale on annotated sets.

Every image of a split (without a pixel size) is segmented once at each zoom of
``SHRINK_LADDER + LADDER`` (``nucli.autoscale.Zoomed``: the network once per zoom, the labels traced
at the image's own resolution) and scored (AJI). ``nucli.autoscale.scan_zoom`` is then replayed on
those records with its look-ahead steps on and off, beside the zoom computed from the annotated
nuclei and the best zoom per image (both need the annotations; upper bounds, not rules). The
constants ``STEP_UP_*`` and ``REJECT_SHRINK`` were chosen with this script on the *train* splits of
dsb2018 and bitdepth_nucseg; the val and test splits only report. Per-image records are cached in
``--cache`` (JSON lines), so an interrupted run resumes.

    python benchmarks/autoscale_scan_rule.py --method gensegnet --split ../shared/data/dsb2018/train \\
        --limit 160 --cache runs/scan_dsb_train.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_WORKING_PX = 2.6e6  # zooms that would make the image larger than this are skipped


def record(method, split: Path, limit: int, cache: Path) -> list[dict]:
    from nucli.autoscale import LADDER, SHRINK_LADDER, Zoomed, diameters
    from nucli.evaluation.labels_io import read_raster, read_rgb
    from nucli.metrics import evaluate_image

    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[r["image"]] = r
    cache.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ip in sorted((split / "images").glob("*.png"))[:limit]:
        if ip.stem in done:
            out.append(done[ip.stem])
            continue
        rgb = read_rgb(ip)
        gt = read_raster(split / "labels" / f"{ip.stem}.tif")
        rows = []
        for z in sorted(set(SHRINK_LADDER + LADDER)):
            if rgb.shape[0] * rgb.shape[1] * z * z > MAX_WORKING_PX:
                continue
            zz = Zoomed(method, rgb, z)
            d = diameters(zz.working())
            rows.append({"z": z, "n": int(d.size), "d": d.round(2).tolist(),
                         "aji": evaluate_image(gt, zz.native())["aji"]})
        g = diameters(gt)
        r = {"image": ip.stem, "gt_median": float(np.median(g)) if g.size else 0.0, "rows": rows}
        with cache.open("a") as fh:
            fh.write(json.dumps(r) + "\n")
        out.append(r)
        print(ip.stem[:12], [(x["z"], x["n"], round(x["aji"], 3)) for x in rows], flush=True)
    return out


def replay(rec: dict, ref: float, **kw) -> float:
    from nucli.autoscale import scan_zoom

    by = {x["z"]: x for x in rec["rows"]}

    def at(z: float):
        x = by.get(z)
        if x is None:  # beyond the size cap: nothing found
            return []
        # labels with the recorded diameters: one disc-free stand-in per nucleus is enough for
        # scan_zoom, which only looks at the equivalent diameters
        return [_labels_with_diameters(x["d"])]

    _, z, _ = scan_zoom(at, ref, **kw)
    return by[z]["aji"] if z in by else by[min(by, key=lambda q: abs(math.log(q / z)))]["aji"]


def _labels_with_diameters(d: list[float]) -> np.ndarray:
    """A 1-row label image whose instances have the equivalent diameters ``d`` (areas rounded)."""
    areas = [max(1, round(math.pi * x * x / 4.0)) for x in d]
    lab = np.zeros((1, max(1, sum(areas))), np.int32)
    i = 0
    for k, a in enumerate(areas, 1):
        lab[0, i:i + a] = k
        i += a
    return lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="gensegnet")
    ap.add_argument("--split", type=Path, action="append", required=True)
    ap.add_argument("--limit", type=int, default=10_000)
    ap.add_argument("--cache", type=Path, default=Path("runs/scan_rule.jsonl"))
    a = ap.parse_args()
    import torch

    from nucli.models.registry import build_method

    torch.set_num_threads(1)
    m = build_method(a.method)
    ref = float(m.config.nucleus_diameter_px)
    for split in a.split:
        cache = a.cache.with_name(f"{a.cache.stem}_{split.parent.name}_{split.name}{a.cache.suffix}")
        recs = record(m, split, a.limit, cache)
        variants = {"search only": dict(step_up=False, reject=False), "+ step up": dict(step_up=True, reject=False),
                    "+ reject": dict(step_up=False, reject=True), "shipped (both)": dict(step_up=True, reject=True)}
        cells = [f"{k} {np.mean([replay(r, ref, **kw) for r in recs]):.4f}" for k, kw in variants.items()]

        def nearest(r, z):
            return min(r["rows"], key=lambda x: abs(math.log(x["z"] / z)))["aji"]
        cells.append(f"annotated-size zoom {np.mean([nearest(r, ref / r['gt_median'] if r['gt_median'] else 1.0) for r in recs]):.4f}")
        cells.append(f"best zoom per image {np.mean([max(x['aji'] for x in r['rows']) for r in recs]):.4f}")
        print(f"{split.parent.name}/{split.name} ({len(recs)} images, mean AJI): " + " | ".join(cells))


if __name__ == "__main__":
    main()
