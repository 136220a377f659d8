"""Seconds per 512x512 tile for each stage (read, enhance, segment, post-process, write, stitch, export)
and end to end, for every registered method whose weights exist.

    python benchmarks/bench_tile_stages.py [--threads 2] [--tiles 3] [--repeats 3] [--methods gensegnet watershed]
                                          [--json results.json]

The input is a run store of tiles x tiles full-tissue 512 px tiles (overlap 64) of a synthetic
H&E-like picture. Stages are timed one after another over all tiles (batches of the method's
batch size) and divided by the number of tiles; "end to end" is the real pipeline on a fresh copy
(``segment_store`` with the serial runner, whose reading, model and post-processing overlap, then
stitching with GeoJSON + CSV export). Medians over repeats. GeNSeg-Net without shipped weights is
timed with its untrained network (labelled in the output): speed does not depend on weight values,
but the post-processing, stitch and export of an untrained network see other nuclei than a trained one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import Timer, hardware, median, methods_to_time, tissue_store  # noqa: E402

STAGES = ("read", "enhance", "segment", "postprocess", "write", "stitch", "export", "end_to_end")
#: the end-to-end run's two halves (segment_store: model + post-processing + writes, overlapped; stitch_store)
E2E_PARTS = ("e2e_segment", "e2e_stitch_export")


def time_stages(entry: dict, pristine: Path, scratch: Path, repeats: int) -> dict:
    from nucli.export import make_sinks, resolve_outputs
    from nucli.pipeline import STAGE, prepare, segment_store, tile_extents, write_tile_result
    from nucli.stitching import stitch_store
    from nucli.tiling.store import RunStore

    method = entry["method"]
    two_step = hasattr(method, "enhance") and hasattr(method, "classify")
    times: dict[str, list[float]] = {k: [] for k in STAGES + E2E_PARTS}
    cpu_times: dict[str, list[float]] = {k: [] for k in STAGES + E2E_PARTS}
    nuclei = 0
    for rep in range(repeats + 1):  # the first round warms up (not counted)
        work = scratch / f"{entry['name']}-{rep}.zarr"
        shutil.copytree(pristine, work)
        store = RunStore.open(work, mode="r+")
        n = store.n_tiles
        bs = int(method.config.batch_size or 1)
        ext = tile_extents(store)
        prepare(store, method)
        t = {k: 0.0 for k in STAGES + E2E_PARTS}
        c = {k: 0.0 for k in STAGES + E2E_PARTS}

        def add(stage: str, tm: Timer) -> None:
            t[stage] += tm.seconds
            c[stage] += tm.cpu
        for k in range(0, n, bs):
            members = list(range(k, min(n, k + bs)))
            w, h = (int(v) for v in ext[members[0]])
            with Timer() as tm:
                pixels = np.stack([store.read_tile(i)[:h, :w] for i in members])
            add("read", tm)
            if two_step:
                with Timer() as tm:
                    enhanced = method.enhance(pixels)
                add("enhance", tm)
                with Timer() as tm:
                    raw = method.classify(enhanced)
                add("segment", tm)
            else:
                with Timer() as tm:
                    raw = method.infer(pixels)
                add("segment", tm)
            with Timer() as tm:
                results = method.postprocess_tiles(raw, pixels)
            add("postprocess", tm)
            with Timer() as tm:
                for i, r in zip(members, results):
                    write_tile_result(store, i, r, (w, h))
            add("write", tm)
        assert store.is_complete(STAGE)
        with Timer() as tm:
            stats = stitch_store(store, [], progress=False)
        add("stitch", tm)
        outs = resolve_outputs(scratch / f"{entry['name']}-{rep}.geojson", ["csv"])
        with Timer() as tm:
            stitch_store(store, make_sinks(outs), progress=False)
        t["export"] = max(0.0, tm.seconds - t["stitch"])
        c["export"] = max(0.0, tm.cpu - c["stitch"])
        nuclei = stats.nuclei

        # the real pipeline end to end on a fresh copy
        e2e = scratch / f"{entry['name']}-{rep}-e2e.zarr"
        shutil.copytree(pristine, e2e)
        s2 = RunStore.open(e2e, mode="r+")
        outs2 = resolve_outputs(scratch / f"{entry['name']}-{rep}-e2e.geojson", ["csv"])
        with Timer() as tm:
            with Timer() as t_seg:
                segment_store(s2, method, progress=False)
            with Timer() as t_out:
                stitch_store(s2, make_sinks(outs2), progress=False)
        add("end_to_end", tm)
        add("e2e_segment", t_seg)
        add("e2e_stitch_export", t_out)
        if rep:
            for k in STAGES + E2E_PARTS:
                times[k].append(t[k] / n)
                cpu_times[k].append(c[k] / n)
        for p in (work, e2e):
            shutil.rmtree(p, ignore_errors=True)
    out = {"note": entry["note"], "nuclei_per_tile": round(nuclei / n, 1), "tiles": n,
           "batch_size": int(method.config.batch_size or 1)}
    for key, src in (("seconds_per_tile", times), ("cpu_seconds_per_tile", cpu_times)):
        per_tile = {k: round(median(v), 4) for k, v in src.items()}
        if not two_step:
            per_tile["enhance"] = None
        per_tile["sum_of_stages"] = round(sum(v for k, v in per_tile.items() if k in STAGES[:-1] and v), 4)
        out[key] = per_tile
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the cores to use)")
    ap.add_argument("--tiles", type=int, default=3, help="tiles per side of the test store")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    result = {"hardware": hardware(), "threads": args.threads, "tile": 512, "repeats": args.repeats, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="nucli-bench-") as tmp:
        scratch = Path(tmp)
        pristine = scratch / "pristine.zarr"
        tissue_store(pristine, args.tiles)
        for entry in methods_to_time(args.methods, scratch):
            if "skipped" in entry:
                result["methods"][entry["name"]] = {"skipped": entry["skipped"]}
                continue
            print(f"timing {entry['name']} ({entry['note']}) ...", file=sys.stderr, flush=True)
            result["methods"][entry["name"]] = time_stages(entry, pristine, scratch, args.repeats)
    result["load_after"] = hardware()["load_1_5_15"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print(_table(result), file=sys.stderr)


def _table(result: dict) -> str:
    cols = ("read", "enhance", "segment", "postprocess", "write", "stitch", "export", "sum_of_stages", "end_to_end")
    lines = ["| method | clock | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, r in result["methods"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} |")
            continue
        for label, key in (("wall", "seconds_per_tile"), ("cpu", "cpu_seconds_per_tile")):
            s = r[key]
            lines.append(f"| {name} | {label} | " + " | ".join("-" if s[c] is None else f"{s[c]:.3f}" for c in cols)
                         + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
