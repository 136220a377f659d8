"""--device: resolution and its one-line errors, GPUs simulated (torch.cuda patched), the device in
summaries / --json / the run store, batch size from free GPU memory, out-of-memory retry, one GPU per
Dask worker, resuming a store on another device, and the CPU path unchanged on the CMU slide."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nucli.cli import app
from nucli.errors import ProcessingError, UsageError
from nucli.models.base import Method, MethodConfig, TileResult
from nucli.parallel import Batch, Runner, make_runner
from nucli.parallel import device as devmod
from nucli.parallel.device import (CPU, Device, DeviceError, OomRetry, TrainingDevice, amp_dtype, auto_batch_size,
                                   resolve_device, worker_device)
from nucli.pipeline import segment_store, store_from_array
from nucli.tiling.store import RunStore
from test_watershed import HE_BACKGROUND, HE_NUCLEUS, blob_labels, render

cli = CliRunner()
GIB = 2**30


def invoke(*args):
    return cli.invoke(app, [str(a) for a in args], catch_exceptions=False)


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two CUDA GPUs of 80 GiB (60 GiB free on the first, 20 on the second), with bfloat16."""
    free = {0: 60 * GIB, 1: 20 * GIB}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"Simulated GPU {i}")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (free[int(i or 0)], 80 * GIB))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(devmod, "mps_available", lambda: False)
    return free


# ----------------------------------------------------------------------------- resolution
def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    no_gpu(monkeypatch)
    assert resolve_device("auto") == CPU and resolve_device(None) == CPU
    assert resolve_device("CPU") == CPU
    assert CPU.record() == {"device": "cpu", "gpu": None}


def test_auto_and_cuda_pick_the_first_gpu_and_name_it(two_gpus):
    dev = resolve_device("auto")
    assert (dev.name, dev.gpu, dev.count, dev.free_bytes, dev.total_bytes) == \
        ("cuda:0", "Simulated GPU 0", 2, 60 * GIB, 80 * GIB)
    assert resolve_device("cuda") == dev and not dev.pinned
    second = resolve_device("cuda:1")
    assert second.record() == {"device": "cuda:1", "gpu": "Simulated GPU 1"} and second.pinned
    assert "cuda:1 (Simulated GPU 1, 20 of 80 GiB free)" == second.describe()


@pytest.mark.parametrize("spec, message", [
    ("cuda", "--device cuda: torch sees no usable CUDA GPU"),
    ("cuda:0", "--device cuda:0: torch sees no usable CUDA GPU"),
    ("mps", "--device mps: Apple's MPS is not available here"),
    ("gpu", "--device 'gpu': expected one of auto, cpu, cuda, cuda:N, mps"),
    ("cpu:1", "expected one of"),
])
def test_unusable_devices_are_errors_naming_what_is_available(monkeypatch, spec, message):
    no_gpu(monkeypatch)
    monkeypatch.setattr(devmod, "mps_available", lambda: False)
    with pytest.raises(DeviceError, match="available") as err:
        resolve_device(spec)
    assert message in str(err.value) and str(err.value).endswith("cpu")
    assert err.value.exit_code == 1


def test_a_gpu_index_past_the_last_names_the_gpus(two_gpus):
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda:7")
    assert str(err.value) == "--device cuda:7: this machine has 2 CUDA GPU(s); available: cpu, cuda:0, cuda:1"


def _png(tmp_path: Path) -> Path:
    from PIL import Image

    gt = blob_labels(300, 300, 30, seed=3, r=(7, 10))
    path = tmp_path / "in.png"
    Image.fromarray(render(gt, HE_NUCLEUS, HE_BACKGROUND, seed=3)).save(path)
    return path


@pytest.mark.parametrize("command", ["segment", "enhance", "evaluate", "train", "demo", "info"])
def test_every_command_refuses_a_missing_gpu_in_one_line_and_creates_nothing(tmp_path, two_gpus, command):
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "labels").mkdir()
    src = _png(tmp_path / "ds" / "images")
    out = tmp_path / "out"
    args = {
        "segment": ["segment", src, "-o", out / "n.geojson", "--method", "watershed"],
        "enhance": ["enhance", src, "-o", out / "e.png"],
        "evaluate": ["evaluate", "--dataset", tmp_path / "ds", "--method", "watershed", "-o", out / "r.json"],
        "train": ["train", "--data", tmp_path / "ds", "-o", out],
        "demo": ["demo", "-o", out],
        "info": ["info", src, "--method", "watershed"],
    }[command]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = invoke(*args, "--device", "cuda:7")
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines == ["Error: --device cuda:7: this machine has 2 CUDA GPU(s); available: cpu, cuda:0, cuda:1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no run store


def test_precision_is_checked_and_chosen_per_gpu(two_gpus, monkeypatch):
    gpu = resolve_device("cuda")
    assert amp_dtype(gpu) is torch.bfloat16 and amp_dtype(gpu, "fp16") is torch.float16
    assert amp_dtype(gpu, "fp32") is None and amp_dtype(CPU, "bf16") is None  # the CPU keeps its own setting
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_dtype(gpu) is torch.float16  # an older GPU without bfloat16
    with pytest.raises(UsageError, match="--precision 'fp8': expected one of auto, bf16, fp16, fp32"):
        amp_dtype(CPU, "fp8")
    r = invoke("segment", "x.png", "-o", "x.geojson", "--device", "cpu", "--precision", "fp8")
    assert r.exit_code == 1 and "--precision 'fp8'" in r.output


def test_batch_size_follows_free_gpu_memory(two_gpus):
    # 4 KiB per working pixel: a 512 px tile costs 1 GiB; 70 % of the free memory, at most 64 tiles
    assert auto_batch_size(resolve_device("cuda:0"), 512, 4) == 42
    assert auto_batch_size(resolve_device("cuda:1"), 512, 4) == 14
    assert auto_batch_size(resolve_device("cuda:0"), 128, 4) == 64
    assert auto_batch_size(CPU, 512, 4) == 4


# ----------------------------------------------------------------------------- out of memory
class _Hungry(Method):
    """Segments by thresholding; its 'model' runs out of memory on batches above ``fits`` tiles."""

    def __init__(self, fits: int):
        super().__init__(MethodConfig(name="hungry", batch_size=8, max_nucleus_diameter_px=30, overlap=32))
        self.fits = fits
        self.calls: list[int] = []

    def infer(self, tiles):
        self.calls.append(len(tiles))
        if len(tiles) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return np.asarray(tiles)

    def postprocess(self, raw):
        from scipy import ndimage

        out = []
        for t in raw:
            lab, _ = ndimage.label(t.mean(axis=-1) < 150)
            out.append(TileResult(lab.astype(np.int32)))
        return out


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dev")
    gt = blob_labels(640, 640, 120, seed=5, r=(6, 9))
    store_from_array(d / "run.zarr", render(gt, HE_NUCLEUS, HE_BACKGROUND, seed=5), tile_size=128, overlap=32,
                     source_mpp=0.5, fingerprint="device-test")
    return d / "run.zarr"


def _copy(src: Path, dest: Path) -> RunStore:
    shutil.copytree(src, dest)
    return RunStore.open(dest, mode="r+")


def test_out_of_memory_halves_the_batch_retries_it_and_says_so_once(tmp_path, small_store, caplog):
    ref = _copy(small_store, tmp_path / "ref.zarr")
    segment_store(ref, _Hungry(fits=100), batch_size=8, progress=False)
    store = _copy(small_store, tmp_path / "oom.zarr")
    method = _Hungry(fits=2)
    with caplog.at_level(logging.WARNING, logger="nucli"):
        segment_store(store, method, batch_size=8, progress=False)
    n = store.n_tiles
    assert store.done("segment").all()  # no tile lost
    np.testing.assert_array_equal(store.array("labels")[:], ref.array("labels")[:])
    # 8 -> 4 -> 2 for the first batch; later batches start at 2 at once
    assert method.calls[:3] == [8, 4, 2] and set(method.calls[3:]) <= {2, 1}
    assert sum(c for c in method.calls if c <= 2) == n
    said = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert said == ["out of memory on the device with a batch of 8 tiles; continuing with batches of 4 "
                    "(set --batch-size to choose)"]


def test_a_single_tile_that_does_not_fit_is_one_line_and_keeps_the_finished_tiles(tmp_path, small_store):
    store = _copy(small_store, tmp_path / "one.zarr")

    class _Worse(_Hungry):
        def infer(self, tiles):
            if self.calls.count(1) >= 3:  # the first three tiles fit, then the memory is gone
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return super().infer(tiles)

    with pytest.raises(ProcessingError) as err:
        segment_store(store, _Worse(fits=1), batch_size=4, progress=False)
    assert str(err.value).startswith("out of memory on the device for a single 128x128 px tile; use a smaller "
                                     "--tile-size or --device cpu")
    assert int(store.done("segment").sum()) == 3  # what the model finished is written: a rerun resumes


def test_only_out_of_memory_errors_are_retried():
    class _Job:
        def compute(self, method, data):
            raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        list(OomRetry().compute(_Job(), None, Batch((0, 1), (8, 8)), np.zeros((2, 8, 8, 3))))
    assert devmod.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert devmod.is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not devmod.is_out_of_memory(RuntimeError("shape mismatch"))


# ----------------------------------------------------------------------------- summaries, --json, the store
def test_segment_json_and_store_record_the_device(tmp_path, small_store, monkeypatch):
    no_gpu(monkeypatch)
    store = tmp_path / "run.zarr"
    shutil.copytree(small_store, store)
    r = invoke("segment", store, "--method", "watershed", "-o", tmp_path / "n.geojson", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert (summary["device"], summary["gpu"], summary["batch_size"]) == ("cpu", None, 8)
    assert RunStore.open(store).meta["devices"] == {"segment": [{"device": "cpu", "gpu": None}]}
    text = invoke("segment", store, "--method", "watershed", "-o", tmp_path / "m.geojson")
    assert text.exit_code == 0 and "device" in text.stdout and "cpu" in text.stdout


def test_a_store_segmented_on_one_device_resumes_on_another(tmp_path, small_store, two_gpus):
    ref = tmp_path / "ref.zarr"
    shutil.copytree(small_store, ref)
    assert invoke("segment", ref, "--method", "watershed", "--device", "cpu", "-o", tmp_path / "ref.geojson",
                  "--quiet").exit_code == 0
    store = tmp_path / "run.zarr"
    shutil.copytree(small_store, store)
    half = invoke("segment", store, "--method", "watershed", "--device", "cpu", "--shard", "0/2", "--json")
    assert half.exit_code == 0, half.output
    done_before = int(RunStore.open(store).done("segment").sum())
    assert 0 < done_before < RunStore.open(store).n_tiles
    # the rest on the (simulated) second GPU: not a "different" store
    r = invoke("segment", store, "--method", "watershed", "--device", "cuda:1", "-o", tmp_path / "n.geojson",
               "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert (summary["device"], summary["gpu"]) == ("cuda:1", "Simulated GPU 1")
    assert summary["tiles_segmented_now"] == RunStore.open(store).n_tiles - done_before
    assert summary["batch_size"] == 64  # 20 GiB free holds more 128 px tiles than the cap
    assert RunStore.open(store).meta["devices"]["segment"] == [
        {"device": "cpu", "gpu": None}, {"device": "cuda:1", "gpu": "Simulated GPU 1"}]
    assert (tmp_path / "n.geojson").read_bytes() == (tmp_path / "ref.geojson").read_bytes()


def test_info_shows_the_device_and_the_devices_there_are(tmp_path, two_gpus):
    r = invoke("info", _png(tmp_path), "--method", "watershed", "--probe", "0", "--json", "--device", "cuda")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert (info["device"], info["gpu"], info["devices"]) == ("cuda:0", "Simulated GPU 0", ["cpu", "cuda:0", "cuda:1"])


# ----------------------------------------------------------------------------- Dask: one GPU per worker
def test_local_workers_are_pinned_one_per_gpu(two_gpus, monkeypatch):
    gpus = resolve_device("auto")
    r = make_runner(workers=2, device=gpus)
    assert r.per_worker_gpu and r.method_device() == "cuda"
    assert r.describe() == "dask local: 2 worker(s) x 1 thread(s), one GPU per worker (cuda:0, cuda:1)"
    assert make_runner(cluster="local", device=gpus).workers == 2  # one worker per GPU
    pinned = make_runner(workers=2, device=resolve_device("cuda:1"))
    assert not pinned.per_worker_gpu and pinned.method_device() == "cuda:1"
    assert make_runner(workers=2, device=CPU).method_device() == "cpu"

    import distributed

    class _Worker:
        def __init__(self, name):
            self.name = name

    for name, want in ((0, "cuda:0"), (1, "cuda:1"), (2, "cuda:0"), ("SLURMCluster-3-1", "cuda:1")):
        monkeypatch.setattr(distributed, "get_worker", lambda name=name: _Worker(name))
        assert worker_device("cuda") == want
    assert worker_device("cuda:1") == "cuda:1" and worker_device("cpu") == "cpu"


def test_remote_workers_resolve_the_device_themselves(monkeypatch):
    no_gpu(monkeypatch)
    dev = resolve_device("cuda", remote=True)  # the client of a GPU cluster needs no GPU itself
    assert dev.remote and dev.record() == {"device": "cuda (on the workers)", "gpu": None}
    assert Runner("scheduler", scheduler="tcp://x:1", device=dev).method_device() == "cuda"
    assert worker_device("auto") == "cpu"  # a worker without a GPU
    with pytest.raises(DeviceError):
        resolve_device("gpu", remote=True)


# ----------------------------------------------------------------------------- training
def test_training_on_the_cpu_is_the_plain_loop():
    t = TrainingDevice(None)
    assert not t.active and t.dtype is None and t.scaler is None
    batch = {"x": torch.ones(2, 1, 4, 4), "cls": [torch.zeros(2)]}
    assert t.batch(batch) is batch
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    w0 = net.weight.detach().clone()
    with t.autocast():
        loss = net(torch.ones(1, 3)).sum()
    t.step(loss, opt)
    np.testing.assert_allclose(net.weight.detach().numpy(), (w0 - 0.1).numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------- the CPU path is unchanged
# Digests of the CMU slide's default (gensegnet) run on the CPU: the GeoJSON of the run before --device
# existed was byte-identical after it; these digests of the per-tile labels and of the nucleus outlines do
# not depend on the measurement columns. A deliberate change to the method or its weights changes them
# (last: the U-Net in bfloat16 throughout on the CPU, nucli.models.cpu_bf16; F1 0.998 against the
# autocast run's nuclei): regenerate with
# `nucli segment CMU-1-Small-Region.svs -o x.geojson --device cpu`.
CMU_LABELS_SHA256 = "8885a5d36203ba4df8bcbe25b6e154fa782e9e8e8fd7726ec6377b0199e9d00f"
CMU_OUTLINES_SHA256 = "4401ef6421ef9e39b5ccc921bdee54b5772e6f621533fff4d8b248e49c05ecd9"


@pytest.mark.slow
@pytest.mark.data
def test_cpu_outputs_on_the_cmu_slide_are_those_from_before_devices(cmu_slide, tmp_path, monkeypatch):
    from nucli.models.registry import get_spec, sha256_of

    spec = get_spec("gensegnet")
    if spec.weights_sha256 and sha256_of(spec.weights_path) != spec.weights_sha256:
        pytest.skip("gensegnet weights differ from the pinned ones")
    no_gpu(monkeypatch)  # auto -> cpu, as on a machine without a GPU
    out = tmp_path / "cmu.geojson"
    r = invoke("segment", cmu_slide, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["device"] == "cpu"
    labels = np.asarray(RunStore.open(tmp_path / "cmu.nucli.zarr").array("labels")[:])
    assert hashlib.sha256(labels.tobytes()).hexdigest() == CMU_LABELS_SHA256
    features = json.loads(out.read_text())["features"]
    outlines = json.dumps([f["geometry"] for f in features], sort_keys=True).encode()
    assert len(features) == 2280 and hashlib.sha256(outlines).hexdigest() == CMU_OUTLINES_SHA256


def test_post_processing_on_several_threads_gives_the_same_nuclei(tmp_path, small_store):
    from nucli.models.registry import build_method

    one = _copy(small_store, tmp_path / "one.zarr")
    many = _copy(small_store, tmp_path / "many.zarr")
    segment_store(one, build_method("watershed"), batch_size=8, progress=False, post_threads=1)
    segment_store(many, build_method("watershed"), batch_size=8, progress=False, post_threads=3)
    assert one.n_tiles > 8 and many.done("segment").all()
    np.testing.assert_array_equal(one.array("labels")[:], many.array("labels")[:])
    from nucli.parallel.device import post_threads_for

    assert post_threads_for(CPU) is None  # the CPU path: the pipeline's own rule (tests/test_segment.py)


def test_gpu_cluster_example_asks_one_gpu_per_worker_job():
    from nucli.parallel import load_cluster_config, slurm_cluster

    examples = Path(__file__).resolve().parents[1] / "examples"
    cfg = load_cluster_config(examples / "dask_jobqueue_gpu.yaml")
    cluster, scale = slurm_cluster({**cfg, "scheduler_options": {"host": "127.0.0.1"}})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert scale == {"jobs": 4} and "#SBATCH --gres=gpu:1" in script and "#SBATCH -p gpu" in script
    assert "--nthreads 2" in script and "--cpus-per-task=8" in script
    assert "--device cuda --batch-size" in (examples / "slurm_dask_gpu.sh").read_text()
