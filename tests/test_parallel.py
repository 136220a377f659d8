"""Parallel runs: serial, Dask local and a real scheduler + workers give the same nuclei; --shard
processes fill one store together; a killed Dask run resumes; the store lock; runner options."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nucli.cli import app
from nucli.errors import InputError, ProcessingError, StoreError, UsageError
from nucli.export.geojson import load, qupath_features
from nucli.models.base import Method, MethodConfig, TileResult
from nucli.models.watershed import CONFIG as WS_CONFIG
from nucli.models.watershed import WatershedMethod
from nucli.parallel import (Batch, MethodRecipe, Runner, Shard, StoreLock, load_cluster_config, make_runner,
                            method_builds, plan_batches, slurm_cluster)
from nucli.pipeline import segment_store, store_from_array
from nucli.tiling.store import RunStore
from test_watershed import HE_BACKGROUND, HE_NUCLEUS, blob_labels, render

runner = CliRunner()
NUCLI = [sys.executable, "-c", "from nucli.cli import app; app()"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def nuclei(path: Path) -> dict[str, bytes]:
    """id -> normalised geometry (WKB) of every nucleus in a GeoJSON file."""
    import shapely
    from shapely.geometry import shape

    return {f["id"]: shapely.to_wkb(shapely.normalize(shape(f["geometry"]))) for f in qupath_features(load(path))}


def labels_of(store_path: Path) -> np.ndarray:
    return np.asarray(RunStore.open(store_path).array("labels")[:])


# ----------------------------------------------------------------------------- shared inputs
@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A tiled run store (25 tiles of 256 px) of a synthetic H&E picture with ~500 nuclei."""
    d = tmp_path_factory.mktemp("pristine")
    gt = blob_labels(1000, 1000, 500, seed=21, r=(7, 11), touching_pairs=20)
    store_from_array(d / "run.zarr", render(gt, HE_NUCLEUS, HE_BACKGROUND, seed=21), tile_size=256, overlap=64,
                     source_mpp=0.5, fingerprint="parallel-test")
    return d / "run.zarr"


def fresh(pristine: Path, dest: Path) -> Path:
    shutil.copytree(pristine, dest)
    return dest


@pytest.fixture(scope="module")
def reference(pristine, tmp_path_factory) -> tuple[Path, Path]:
    """The serial run: (GeoJSON, store)."""
    d = tmp_path_factory.mktemp("serial")
    store = fresh(pristine, d / "run.zarr")
    r = invoke("segment", store, "--method", "watershed", "--batch-size", "2", "-o", d / "n.geojson", "--quiet")
    assert r.exit_code == 0, r.output
    return d / "n.geojson", store


def assert_same_as_reference(geojson: Path, store: Path, reference) -> None:
    ref_geojson, ref_store = reference
    assert RunStore.open(store).is_complete("segment")
    np.testing.assert_array_equal(labels_of(store), labels_of(ref_store))
    got, want = nuclei(geojson), nuclei(ref_geojson)
    assert len(want) > 300
    assert got == want  # same ids, same outlines, order-independent
    assert geojson.read_bytes() == ref_geojson.read_bytes()


class _Cluster(str):
    """The scheduler's address (a str) with its scheduler file."""

    def __new__(cls, address: str, scheduler_file: str):
        obj = super().__new__(cls, address)
        obj.scheduler_file = scheduler_file
        return obj


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A real `dask scheduler` + two `dask worker` processes on 127.0.0.1, torn down afterwards."""
    d = tmp_path_factory.mktemp("cluster")
    sched_file = d / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert sched_file.exists(), "dask scheduler did not start"
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for k in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dask", "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                 "--no-nanny", "--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--name", f"w{k}", "--local-directory", str(d / f"w{k}")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
        yield _Cluster(address, str(sched_file))
        with Client(address, timeout="30s") as client:
            client.shutdown()  # the scheduler and its workers stop themselves
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ----------------------------------------------------------------------------- same output everywhere
def test_dask_local_gives_the_serial_nuclei(tmp_path, pristine, reference):
    store = fresh(pristine, tmp_path / "run.zarr")
    r = invoke("segment", store, "--method", "watershed", "--batch-size", "2", "--workers", "2",
               "-o", tmp_path / "n.geojson", "--json")
    assert r.exit_code == 0, r.output
    summary = last_json(r.output)
    assert summary["runner"].startswith("dask local: 2 worker")
    assert summary["tiles_segmented_now"] == RunStore.open(store).n_tiles
    assert_same_as_reference(tmp_path / "n.geojson", store, reference)


def test_real_cluster_gives_the_serial_nuclei_and_builds_once_per_worker(tmp_path, pristine, reference,
                                                                        dask_cluster):
    from distributed import Client

    store = fresh(pristine, tmp_path / "run.zarr")
    r = invoke("segment", store, "--method", "watershed", "--batch-size", "1", "--scheduler", dask_cluster,
               "-o", tmp_path / "n.geojson", "--json")
    assert r.exit_code == 0, r.output
    assert_same_as_reference(tmp_path / "n.geojson", store, reference)
    n_tiles = RunStore.open(store).n_tiles

    # the workers outlive the run: each built the method once, though it ran many batches
    with Client(dask_cluster, timeout="30s") as client:
        builds = client.run(method_builds)
    key = MethodRecipe.create("watershed").key
    counts = [b.get(key, 0) for b in builds.values()]
    assert len(counts) == 2 and sum(counts) >= 1 and max(counts) == 1 < n_tiles


def test_scheduler_file_and_unreachable_scheduler(tmp_path, pristine, reference, dask_cluster):
    sched_file = Path(dask_cluster.scheduler_file)
    store = fresh(pristine, tmp_path / "run.zarr")
    r = invoke("segment", store, "--method", "watershed", "--scheduler", sched_file, "-o", tmp_path / "n.geojson",
               "--quiet")
    assert r.exit_code == 0, r.output
    assert_same_as_reference(tmp_path / "n.geojson", store, reference)

    with pytest.raises(InputError, match="cannot reach a dask scheduler"):
        Runner.connect("tcp://127.0.0.1:9", connect_timeout=2).client


@pytest.fixture(scope="module")
def local_runner():
    """One local Dask cluster (2 worker processes) shared by the library-level tests."""
    with Runner.local(workers=2, threads=1) as r:
        yield r


def test_library_runner_local_with_a_method_object(tmp_path, pristine, reference, local_runner):
    """A method object without a registry recipe is sent to each worker once; progress counts every tile."""
    store = RunStore.open(fresh(pristine, tmp_path / "run.zarr"), mode="r+")
    seen = []
    local_runner.max_in_flight = 3
    try:
        stats = segment_store(store, WatershedMethod(WS_CONFIG), batch_size=2, progress=False, runner=local_runner,
                              on_batch=seen.append)
    finally:
        local_runner.max_in_flight = None
    assert stats.tiles_segmented == sum(seen) == store.n_tiles
    np.testing.assert_array_equal(labels_of(store.path), labels_of(reference[1]))


# ----------------------------------------------------------------------------- shards
def test_two_shard_processes_fill_one_store(tmp_path, pristine, reference):
    store = fresh(pristine, tmp_path / "run.zarr")
    n_tiles = RunStore.open(store).n_tiles
    procs = [subprocess.Popen([*NUCLI, "segment", str(store), "--method", "watershed", "--batch-size", "1",
                               "--shard", f"{i}/2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    summaries = [last_json(out) for out, _ in outs]
    assert [s["tiles_segmented_now"] for s in summaries] == [len(range(0, n_tiles, 2)), len(range(1, n_tiles, 2))]
    assert any(s["complete"] for s in summaries)
    assert not (tmp_path / ".run.zarr.lock").exists()

    r = invoke("stitch", store, "-o", tmp_path / "n.geojson", "--quiet")
    assert r.exit_code == 0, r.output
    assert_same_as_reference(tmp_path / "n.geojson", store, reference)

    # a shard rerun on a finished store has nothing to do
    r = invoke("segment", store, "--method", "watershed", "--shard", "1/2", "--json")
    assert r.exit_code == 0 and last_json(r.output)["tiles_segmented_now"] == 0


def test_shard_selection_partitions_the_tiles():
    tiles = np.arange(103)
    parts = [Shard.parse(f"{i}/7").select(tiles) for i in range(7)]
    assert sorted(np.concatenate(parts).tolist()) == tiles.tolist()
    assert all(len(p) in (14, 15) for p in parts)
    # stable: a shard's tiles do not move when other tiles finish first
    assert Shard(2, 7).select(np.array([2, 3, 9, 16, 30])).tolist() == [2, 9, 16, 30]
    for bad in ("2", "2/2", "-1/3", "a/b", "1/0", "1/2/3"):
        with pytest.raises(UsageError, match="i/n"):
            Shard.parse(bad)


def test_shard_usage_errors(tmp_path, pristine):
    store = fresh(pristine, tmp_path / "run.zarr")
    r = invoke("segment", store, "--method", "watershed", "--shard", "3/2")
    assert r.exit_code == 1 and "0 <= i < n" in r.output
    r = invoke("segment", store, "--method", "watershed", "--shard", "0/2", "-o", tmp_path / "a.geojson")
    assert r.exit_code == 1 and "nucli stitch" in r.output
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(png)
    r = invoke("segment", png, "--method", "watershed", "--shard", "0/2")
    assert r.exit_code == 1 and "nucli tile" in r.output
    r = invoke("segment", store, "--method", "watershed")
    assert r.exit_code == 1 and "-o/--output is required" in r.output
    assert not RunStore.open(store).has("done/segment")


# ----------------------------------------------------------------------------- kill and resume
def test_sigkill_of_a_dask_run_then_rerun_matches(tmp_path, pristine, reference):
    """A `--workers` run killed by SIGKILL leaves a stale lock; the rerun takes it over and finishes
    only the unfinished tiles. (The serial kill test is test_segment.py's.)"""
    import psutil

    store = fresh(pristine, tmp_path / "run.zarr")
    n_tiles = RunStore.open(store).n_tiles
    cmd = [*NUCLI, "segment", str(store), "--method", "watershed", "--batch-size", "1", "--quiet"]
    proc = subprocess.Popen([*cmd, "--workers", "1", "-o", str(tmp_path / "killed.geojson")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = False
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = int(RunStore.open(store).done("segment").sum()) if RunStore.open(store).has("done/segment") else 0
        if done >= 3:
            children = psutil.Process(proc.pid).children(recursive=True)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
            break
        time.sleep(0.02)
    assert killed, f"the run ended before it could be killed: {proc.stderr.read()}"
    # the orphaned dask worker notices its parent is gone and exits
    _, alive = psutil.wait_procs(children, timeout=60)
    for p in alive:
        p.kill()
    lock = tmp_path / ".run.zarr.lock"
    assert lock.exists() and json.loads(lock.read_text())["pid"] == proc.pid
    done_after_kill = int(RunStore.open(store).done("segment").sum())
    assert 3 <= done_after_kill < n_tiles

    again = subprocess.run([*cmd, "-o", str(tmp_path / "n.geojson"), "--json"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert last_json(again.stdout)["tiles_segmented_now"] == n_tiles - done_after_kill
    assert not lock.exists()
    assert_same_as_reference(tmp_path / "n.geojson", store, reference)


# ----------------------------------------------------------------------------- the store lock
def test_a_second_writer_without_shard_is_refused(tmp_path, pristine):
    store = fresh(pristine, tmp_path / "run.zarr")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nucli.parallel import StoreLock; "
         f"StoreLock({str(store)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = invoke("segment", store, "--method", "watershed", "-o", tmp_path / "a.geojson")
        assert r.exit_code == 2
        assert f"being written by another nucli process (pid {holder.pid}" in r.output and "--shard" in r.output
        r = invoke("segment", store, "--method", "watershed", "--shard", "0/2")
        assert r.exit_code == 2 and "without --shard" in r.output
        assert not (tmp_path / "a.geojson").exists()
        assert int(RunStore.open(store).done("segment").sum()) == 0
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file is taken over
    assert (tmp_path / ".run.zarr.lock").exists()
    r = invoke("segment", store, "--method", "watershed", "-o", tmp_path / "a.geojson", "--quiet")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / ".run.zarr.lock").exists()


def test_shards_share_the_lock_but_exclude_a_plain_writer(tmp_path, pristine):
    store = fresh(pristine, tmp_path / "run.zarr")
    with StoreLock(store, Shard(0, 2)), StoreLock(store, Shard(1, 2)):
        with pytest.raises(StoreError, match="being filled by --shard processes"):
            StoreLock(store).acquire()
    with StoreLock(store):
        with pytest.raises(StoreError, match="without --shard"):
            StoreLock(store, Shard(0, 2)).acquire()
    assert not (tmp_path / ".run.zarr.lock").exists()


def test_stale_lock_record_of_a_dead_process_is_taken_over(tmp_path, pristine):
    store = fresh(pristine, tmp_path / "run.zarr")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".run.zarr.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    s = RunStore.open(store, mode="r+")
    segment_store(s, WatershedMethod(WS_CONFIG), progress=False)
    assert s.is_complete("segment") and not (tmp_path / ".run.zarr.lock").exists()


# ----------------------------------------------------------------------------- the serial pipeline
class _Recorder:
    """A job whose steps record the order of events; finish(k) waits until compute(k+1) has started."""

    stage = "test"

    def __init__(self, n: int, fail_at: int | None = None):
        self.n = n
        self.fail_at = fail_at
        self.events: list[tuple[str, int]] = []
        self.started = [threading.Event() for _ in range(n + 1)]
        self.started[n].set()
        self.waited_too_long = False
        self.live = 0
        self.max_live = 0
        self.lock = threading.Lock()

    def _log(self, what, k):
        with self.lock:
            self.events.append((what, k))

    def load(self, store, batch):
        k = batch.members[0]
        with self.lock:
            self.live += 1
            self.max_live = max(self.max_live, self.live)
        self._log("load", k)
        return k

    def compute(self, method, k):
        self.started[k].set()
        self._log("compute", k)
        if k == self.fail_at:
            raise RuntimeError("model failed")
        return k

    def finish(self, store, method, batch, k):
        if not self.started[k + 1].wait(timeout=10):
            self.waited_too_long = True
        self._log("finish", k)
        with self.lock:
            self.live -= 1


def test_serial_pipeline_overlaps_postprocessing_with_the_model_and_bounds_memory():
    n = 12
    job = _Recorder(n)
    batches = [Batch((k,), (8, 8)) for k in range(n)]
    counted = []
    done = Runner.serial().run(None, job, None, batches, advance=counted.append)
    assert done == n and sum(counted) == n
    assert not job.waited_too_long  # finish(k) ran while the model was on batch k+1
    assert [k for what, k in job.events if what == "finish"] == list(range(n))  # written in order
    assert job.max_live <= 2 * Runner.serial().prefetch + 1  # bounded number of batches in memory


def test_serial_pipeline_error_still_writes_what_the_model_finished():
    job = _Recorder(8, fail_at=4)
    with pytest.raises(RuntimeError, match="model failed"):
        Runner.serial().run(None, job, None, [Batch((k,), (8, 8)) for k in range(8)])
    assert [k for what, k in job.events if what == "finish"] == [0, 1, 2, 3]


def test_plan_batches_groups_equal_extents_in_order():
    extents = np.array([[256, 256]] * 5 + [[100, 256]] * 2 + [[256, 256]])
    plan = plan_batches([0, 1, 2, 4, 5, 6, 7], extents, 3)
    assert plan == [Batch((0, 1, 2), (256, 256)), Batch((4,), (256, 256)), Batch((5, 6), (100, 256)),
                    Batch((7,), (256, 256))]


class _WrongShape(Method):
    """A broken method: labels of the wrong shape."""

    def postprocess(self, raw):
        return [TileResult(np.zeros((3, 3), np.int32)) for _ in raw]


def test_method_errors_on_a_worker_reach_the_user(tmp_path, pristine, local_runner):
    """A method failure inside a Dask worker is the same one-line error as in a serial run."""
    store = RunStore.open(fresh(pristine, tmp_path / "run.zarr"), mode="r+")
    with pytest.raises(ProcessingError, match="labels of shape"):
        segment_store(store, _WrongShape(MethodConfig(name="wrong")), progress=False, runner=local_runner)
    assert int(store.done("segment").sum()) == 0


def test_a_local_cluster_that_cannot_start_is_a_clear_error(monkeypatch):
    import distributed

    def broken(*a, **k):
        raise RuntimeError("Nanny failed to start.")

    monkeypatch.setattr(distributed, "LocalCluster", broken)
    with pytest.raises(ProcessingError, match="could not start 2 local Dask worker.*without --workers"):
        Runner.local(workers=2).client


# ----------------------------------------------------------------------------- options
def test_runner_options():
    assert make_runner().mode == "serial"
    r = make_runner(workers=3)
    assert (r.mode, r.workers, r.threads) == ("local", 3, 1)
    assert make_runner(cluster="local", threads=2).mode == "local"
    assert make_runner(scheduler="tcp://127.0.0.1:8786").mode == "scheduler"
    with pytest.raises(UsageError, match="not both"):
        make_runner(scheduler="tcp://127.0.0.1:8786", cluster="local")
    with pytest.raises(UsageError, match="--cluster-config FILE"):
        make_runner(cluster="slurm")
    with pytest.raises(UsageError, match="is for --cluster slurm"):
        make_runner(cluster_config="x.yaml")


def test_cluster_option_errors_on_the_command_line(tmp_path, pristine):
    store = fresh(pristine, tmp_path / "run.zarr")
    r = invoke("segment", store, "--cluster", "slurm", "-o", tmp_path / "a.geojson")
    assert r.exit_code == 1 and "--cluster-config" in r.output
    r = invoke("segment", store, "--cluster", "slurm", "--cluster-config", tmp_path / "none.yaml",
               "-o", tmp_path / "a.geojson")
    assert r.exit_code == 2 and "file not found" in r.output


SLURM_YAML = """\
# SLURMCluster settings, one SLURM job = one dask worker here
cores: 4
memory: 16GB
processes: 1
walltime: "01:30:00"
account: pathology
queue: cpu
job_extra_directives: ["--constraint=skylake"]
job_script_prologue: ["module load python"]
scheduler_options: {host: 127.0.0.1}
jobs: 3
"""


def test_slurm_config_parses_and_reaches_the_job_script(tmp_path):
    (tmp_path / "c.yaml").write_text(SLURM_YAML)
    cfg = load_cluster_config(tmp_path / "c.yaml")
    assert cfg["cores"] == 4 and cfg["jobs"] == 3
    # dask-jobqueue's own layout and JSON are read too
    (tmp_path / "d.yaml").write_text("jobqueue:\n  slurm:\n    cores: 2\n    memory: 4GB\n")
    assert load_cluster_config(tmp_path / "d.yaml") == {"cores": 2, "memory": "4GB"}
    (tmp_path / "e.json").write_text(json.dumps({"cores": 8, "memory": "32GB", "job-cpu": 8}))
    assert load_cluster_config(tmp_path / "e.json")["job_cpu"] == 8

    cluster, scale = slurm_cluster(cfg)  # builds the scheduler (loopback) and the job script; submits nothing
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert scale == {"jobs": 3}
    for line in ("#SBATCH -A pathology", "#SBATCH -p cpu", "#SBATCH -t 01:30:00", "#SBATCH --constraint=skylake",
                 "module load python", "tcp://127.0.0.1:"):
        assert line in script, line


def test_example_cluster_config_is_valid():
    cfg = load_cluster_config(Path(__file__).resolve().parents[1] / "examples" / "dask_jobqueue.yaml")
    cluster, scale = slurm_cluster({**cfg, "scheduler_options": {"host": "127.0.0.1"}})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert scale == {"jobs": 4} and "#SBATCH -p cpu" in script and "--nworkers 4" in script


FAKE_SBATCH = """#!/usr/bin/env bash
# stands in for sbatch: runs the --wrap command here and now (each array task in turn)
set -euo pipefail
array=""; wrap=""
for a in "$@"; do
  case "$a" in --array=*) array="${a#--array=}";; --wrap=*) wrap="${a#--wrap=}";; esac
done
n=$(cat "$FAKE_SLURM_COUNTER" 2>/dev/null || echo 100); n=$((n + 1)); echo $n > "$FAKE_SLURM_COUNTER"
if [ -n "$array" ]; then
  for i in $(seq "${array%-*}" "${array#*-}"); do SLURM_ARRAY_TASK_ID=$i bash -c "$wrap" >> "$FAKE_SLURM_LOG"; done
else
  bash -c "$wrap" >> "$FAKE_SLURM_LOG"
fi
echo $n
"""


def test_slurm_array_example_runs_end_to_end(tmp_path):
    """examples/slurm_array.sh with a stand-in sbatch: tile once, 2 shards, stitch once."""
    from PIL import Image

    gt = blob_labels(700, 600, 200, seed=5, r=(7, 10), touching_pairs=0)
    Image.fromarray(render(gt, HE_NUCLEUS, HE_BACKGROUND, seed=5)).save(tmp_path / "slide.png")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "examples" / "slurm_array.sh"
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "METHOD": "watershed", "FAKE_SLURM_COUNTER": str(tmp_path / "n"), "FAKE_SLURM_LOG": str(tmp_path / "log")}
    # a PNG has no pixel size: give it through the tile step's options
    env["NUCLI_TILE_OPTS"] = "--mpp 0.5"
    r = subprocess.run(["bash", str(script), "slide.png", "out/slide.geojson", "2"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + (tmp_path / "log").read_text()
    shards = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines() if '"shard"' in line]
    assert sorted(s["shard"] for s in shards) == ["0/2", "1/2"] and shards[-1]["complete"]
    n = len(qupath_features(load(tmp_path / "out" / "slide.geojson")))
    assert abs(n - gt.max()) <= 0.05 * gt.max() and (tmp_path / "out" / "slide.csv").exists()


@pytest.mark.parametrize("text, error, match", [
    ("cores: 4\nmemory: 8GB\ncoers: 2\n", UsageError, "unknown setting.*coers"),
    ("memory: 8GB\n", UsageError, "set cores"),
    ("cores: [4\n", InputError, "not valid YAML"),
    ("- 1\n- 2\n", InputError, "expected a mapping"),
    ("cores: 4\nmemory: 8GB\njobs: 0\n", UsageError, "'jobs' must be"),
    ("cores: 4\nmemory: 8GB\nhost: 127.0.0.1\n", UsageError, "unknown setting.*host"),
])
def test_slurm_config_errors(tmp_path, text, error, match):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(error, match=match):
        load_cluster_config(tmp_path / "c.yaml")
