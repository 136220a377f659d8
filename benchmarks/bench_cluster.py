"""Serial vs Dask local (1 and 2 workers) vs a real `dask scheduler` + 2 `dask worker` processes on 127.0.0.1.

    python benchmarks/bench_cluster.py [--method watershed] [--tiles 4] [--batch-size 2] [--repeats 3]
                                       [--json results.json]

The same run store (tiles x tiles full-tissue 512 px tiles of a synthetic H&E-like picture) is
segmented on a fresh copy by each runner; the segmentation step alone is timed (all clusters are
started and their workers joined first; start-up time is reported apart). The runners take turns
(round-robin, one warm-up round for imports and the method build on each worker, reported as
first_run_s), so a changing machine load hits them alike. Every run's labels are checked equal to
the serial run's. Reported: median wall seconds, and CPU seconds of the client and worker processes
("cores used" = CPU seconds / wall seconds: on a machine shared with other work, how much CPU the
run actually got). Serial uses --threads torch threads in this process; Dask workers
use one torch thread per worker thread (dask sets OMP_NUM_THREADS=1 in worker processes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import hardware, load, median, methods_to_time, tissue_store  # noqa: E402


class LoopbackCluster:
    """`dask scheduler` + N `dask worker` processes (nanny, 1 thread each) on 127.0.0.1."""

    def __init__(self, folder: Path, workers: int = 2, threads: int = 1):
        self.folder = folder
        self.workers = workers
        self.threads = threads
        self.procs: list[subprocess.Popen] = []
        self.address = ""

    def __enter__(self) -> "LoopbackCluster":
        sched_file = self.folder / "scheduler.json"
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)], **quiet))
        deadline = time.time() + 120
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        self.address = json.loads(sched_file.read_text())["address"]
        for k in range(self.workers):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "dask", "worker", self.address, "--host", "127.0.0.1", "--nthreads",
                 str(self.threads), "--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--name", f"w{k}",
                 "--local-directory", str(self.folder / f"w{k}")], **quiet))
        return self

    def __exit__(self, *exc) -> None:
        from distributed import Client

        try:
            with Client(self.address, timeout="20s") as client:
                client.shutdown()
        except Exception:  # noqa: BLE001 - fall back to stopping the processes
            pass
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait()


def labels(path: Path) -> np.ndarray:
    from nucli.tiling.store import RunStore

    return np.asarray(RunStore.open(path).array("labels")[:])


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def bench_method(entry: dict, pristine: Path, scratch: Path, args) -> dict:
    """Every runner on fresh copies of the store, interleaved (A B C D E, A B C D E, ...) so that a
    changing machine load hits them alike; wall and CPU seconds (client + worker processes)."""
    import contextlib
    import os

    from nucli.parallel import MethodRecipe, Runner
    from nucli.pipeline import segment_store
    from nucli.tiling.store import RunStore

    method = entry["method"]
    recipe = MethodRecipe.create(entry["name"], entry["weights"])
    configs = [("serial", lambda: Runner.serial()),
               ("dask local 1 worker x 1 thread", lambda: Runner.local(workers=1, threads=1)),
               ("dask local 1 worker x 2 threads", lambda: Runner.local(workers=1, threads=2)),
               ("dask local 2 workers x 1 thread", lambda: Runner.local(workers=2, threads=1)),
               ("dask scheduler + 2 dask worker processes (loopback)", None)]
    rows: dict[str, dict] = {}
    reference = None
    n = RunStore.open(pristine).n_tiles
    with contextlib.ExitStack() as stack:
        runners = {}
        for name, make in configs:
            t0 = time.perf_counter()
            runner = stack.enter_context(RunnerFor(make, scratch / f"cluster-{entry['name']}"))
            pids = [os.getpid()]
            if runner.is_dask:
                runner.client.wait_for_workers(1 if runner.workers == 1 else 2, timeout=300)
                pids += list(runner.client.run(os.getpid).values())
            runners[name] = (runner, pids)
            rows[name] = {"startup_s": round(time.perf_counter() - t0, 1), "wall": [], "cpu": []}
        for rep in range(args.repeats + 1):  # round 0 warms up: imports and the method build on each worker
            for name, _ in configs:
                runner, pids = runners[name]
                print(f"  {entry['name']}: round {rep}: {name}", file=sys.stderr, flush=True)
                work = scratch / f"{entry['name']}-{rep}.zarr"
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(pristine, work)
                store = RunStore.open(work, mode="r+")
                c0, t1 = _cpu_seconds(pids), time.perf_counter()
                segment_store(store, method, batch_size=args.batch_size, progress=False, runner=runner,
                              recipe=recipe if runner.is_dask else None)
                wall, cpu = time.perf_counter() - t1, _cpu_seconds(pids) - c0
                lab = labels(work)
                if reference is None:
                    reference = lab
                elif not np.array_equal(lab, reference):
                    diff = (lab != reference).reshape(len(lab), -1).sum(1)
                    raise SystemExit(f"{name}: labels differ from the serial run: differing pixels per tile "
                                     f"{diff.tolist()}; nuclei per tile here {lab.reshape(len(lab), -1).max(1).tolist()}"
                                     f", serial {reference.reshape(len(lab), -1).max(1).tolist()}")
                shutil.rmtree(work, ignore_errors=True)
                if rep == 0:
                    rows[name]["first_run_s"] = round(wall, 2)
                else:
                    rows[name]["wall"].append(round(wall, 2))
                    rows[name]["cpu"].append(round(cpu, 2))
                    rows[name].setdefault("load", []).append(load()[0])
                print(f"    wall {wall:.1f} s, cpu {cpu:.1f} s, load {load()[0]}", file=sys.stderr, flush=True)
    for name, row in rows.items():
        row["median_s"] = round(median(row["wall"]), 2)
        row["tiles_per_s"] = round(n / row["median_s"], 3)
        row["cpu_s_per_tile"] = round(median(row["cpu"]) / n, 3)
        row["cpu_share"] = round(median(row["cpu"]) / row["median_s"], 2)  # cores' worth of CPU it got
    one = rows["dask local 1 worker x 1 thread"]
    two = rows["dask local 2 workers x 1 thread"]
    return {"note": entry["note"], "tiles": n, "batch_size": args.batch_size, "runs": rows,
            "speedup_2_workers_over_1": round(one["median_s"] / two["median_s"], 2),
            "cpu_share_2_workers_over_1": round(two["cpu_share"] / one["cpu_share"], 2)}


class RunnerFor:
    """A runner from ``make`` or, when ``make`` is None, one connected to a fresh loopback cluster."""

    def __init__(self, make, folder: Path):
        self.make = make
        self.folder = folder
        self.cluster = None

    def __enter__(self):
        from nucli.parallel import Runner

        if self.make is not None:
            self.runner = self.make()
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.cluster = LoopbackCluster(self.folder).__enter__()
            self.runner = Runner.connect(self.cluster.address)
            self.runner.workers = 2
        return self.runner

    def __exit__(self, *exc):
        self.runner.close()
        if self.cluster is not None:
            self.cluster.__exit__(*exc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=["watershed", "gensegnet"])
    ap.add_argument("--tiles", type=int, default=4, help="tiles per side of the test store")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the serial run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    result = {"hardware": hardware(), "methods": {}}
    with tempfile.TemporaryDirectory(prefix="nucli-cluster-") as tmp:
        scratch = Path(tmp)
        pristine = scratch / "pristine.zarr"
        tissue_store(pristine, args.tiles)
        for entry in methods_to_time(args.methods, scratch):
            if "skipped" in entry:
                result["methods"][entry["name"]] = {"skipped": entry["skipped"]}
                continue
            result["methods"][entry["name"]] = bench_method(entry, pristine, scratch, args)
    result["load_after"] = load()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    lines = ["| method | runner | start-up s | segment s (median) | tiles/s | CPU s/tile | cores used |",
             "|---|---|---|---|---|---|---|"]
    for m, r in result["methods"].items():
        for name, row in r.get("runs", {}).items():
            lines.append(f"| {m} | {name} | {row['startup_s']} | {row['median_s']} | {row['tiles_per_s']} | "
                         f"{row['cpu_s_per_tile']} | {row['cpu_share']} |")
        if "speedup_2_workers_over_1" in r:
            lines.append(f"| {m} | speed-up 2 workers / 1 | | {r['speedup_2_workers_over_1']}x | | | "
                         f"{r['cpu_share_2_workers_over_1']}x |")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
