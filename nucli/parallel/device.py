"""Devices: the one place that knows CPUs, CUDA GPUs and Apple's MPS.

``--device auto|cpu|cuda|cuda:N|mps`` is resolved once per command by
:func:`resolve_device` (before anything is created): ``auto`` is the first CUDA
GPU when torch sees one, else the CPU; an explicit device that is not usable is
a one-line :class:`DeviceError` naming the devices that are. The result, a
:class:`Device`, also says the GPU's name and how much of its memory is free,
and is what summaries, ``--json``, ``nucli info`` and the run store record.

Also here, for the runner: the mixed precision a method runs in on a GPU
(:func:`amp_dtype`, :func:`on_device`), the batch size free GPU memory allows
(:func:`auto_batch_size`), the out-of-memory retry that halves a batch
(:class:`OomRetry`) and the device a Dask worker is pinned to
(:func:`worker_device`). Methods only see the device string they are built
on; they never import this module.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from nucli.errors import ProcessingError, UsageError

log = logging.getLogger("nucli.parallel")

CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
#: ``cuda`` handed to Dask workers: each worker takes its own GPU (see :func:`worker_device`)
PER_WORKER = "cuda"

# Device memory one tile costs in a batch, per working pixel (activations of the U-Nets in half
# precision plus the float32 inputs and outputs), with a safety margin; out-of-memory errors are
# still caught and the batch halved (:class:`OomRetry`).
BYTES_PER_PIXEL = 4096
MAX_AUTO_BATCH = 64
FREE_MEMORY_SHARE = 0.7

_SPEC = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


class DeviceError(UsageError):
    """``--device`` names a device this machine does not have (exit code 1)."""


@dataclass(frozen=True)
class Device:
    """A resolved device: ``name`` as torch spells it (``cpu``, ``cuda:0``, ``mps``)."""

    name: str
    gpu: str | None = None          # the GPU's name (CUDA), None on the CPU
    total_bytes: int | None = None  # GPU memory
    free_bytes: int | None = None   # free GPU memory when resolved
    count: int = 0                  # CUDA GPUs visible to torch
    pinned: bool = False            # the user named the GPU (cuda:N): Dask workers all use it
    remote: bool = False            # resolved by each Dask worker (a scheduler's or SLURM's), not here

    @property
    def kind(self) -> str:
        return self.name.split(":")[0]

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def index(self) -> int | None:
        return int(self.name.split(":")[1]) if ":" in self.name else None

    def record(self) -> dict[str, Any]:
        """What summaries, ``--json`` and the run store show: ``device`` and ``gpu``."""
        return {"device": f"{self.name} (on the workers)" if self.remote else self.name, "gpu": self.gpu}

    def describe(self) -> str:
        if self.remote:
            return f"{self.name} (on the workers)"
        if self.gpu is None:
            return self.name
        free = f", {self.free_bytes / 2**30:.0f} of {self.total_bytes / 2**30:.0f} GiB free" \
            if self.free_bytes is not None and self.total_bytes else ""
        return f"{self.name} ({self.gpu}{free})"


CPU = Device("cpu")


# --------------------------------------------------------------------------- what torch sees
def _torch() -> Any:
    import torch

    return torch


def cuda_count() -> int:
    """CUDA GPUs torch can use (0 without a CUDA build or driver)."""
    torch = _torch()
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except (RuntimeError, AssertionError):  # a broken driver: no usable GPU
        return 0


def mps_available() -> bool:
    torch = _torch()
    mps = getattr(torch.backends, "mps", None)
    try:
        return bool(mps is not None and mps.is_available())
    except RuntimeError:
        return False


def available_devices() -> list[str]:
    """The devices ``--device`` accepts here, e.g. ``['cpu', 'cuda:0', 'cuda:1']``."""
    out = ["cpu"] + [f"cuda:{i}" for i in range(cuda_count())]
    if mps_available():
        out.append("mps")
    return out


def _cuda_device(index: int, count: int, pinned: bool = False) -> Device:
    torch = _torch()
    try:
        name = str(torch.cuda.get_device_name(index))
    except (RuntimeError, AssertionError):
        name = "CUDA GPU"
    try:
        free, total = (int(v) for v in torch.cuda.mem_get_info(index))
    except (RuntimeError, AssertionError, TypeError):
        free = total = None
    return Device(f"cuda:{index}", gpu=name, total_bytes=total, free_bytes=free, count=count, pinned=pinned)


def resolve_device(spec: "str | Device | None" = "auto", remote: bool = False) -> Device:
    """``auto|cpu|cuda|cuda:N|mps`` -> a :class:`Device`; a device this machine lacks is a DeviceError.

    ``auto`` (and None): ``cuda:0`` when torch sees a CUDA GPU, else the CPU (never MPS, whose
    results have not been measured). ``cuda`` is ``cuda:0``. ``remote``: the work runs on the
    workers of a Dask scheduler or SLURM jobs, which resolve the device themselves
    (:func:`worker_device`); only the spelling is checked here.
    """
    if isinstance(spec, Device):
        return spec
    text = "auto" if spec is None else str(spec).strip().lower()
    m = _SPEC.match(text)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise DeviceError(f"--device {spec!r}: expected one of {', '.join(CHOICES)}; "
                          f"available here: {', '.join(available_devices())}")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return CPU
    if remote:
        return Device(text, pinned=index is not None, remote=True)
    count = cuda_count()
    if kind == "auto":
        return _cuda_device(0, count) if count else CPU
    if kind == "mps":
        if not mps_available():
            raise DeviceError(f"--device mps: Apple's MPS is not available here (macOS with Apple silicon only); "
                              f"available: {', '.join(available_devices())}")
        return Device("mps")
    if count == 0:
        raise DeviceError(f"--device {text}: torch sees no usable CUDA GPU (no GPU, no driver, or the CPU build "
                          f"of torch; see the README's GPU install); available: {', '.join(available_devices())}")
    i = int(index or 0)
    if i >= count:
        raise DeviceError(f"--device {text}: this machine has {count} CUDA GPU(s); "
                          f"available: {', '.join(available_devices())}")
    return _cuda_device(i, count, pinned=index is not None)


def free_bytes(device: Device) -> int | None:
    """Free memory on a CUDA device now (None elsewhere)."""
    if not device.is_cuda:
        return None
    try:
        return int(_torch().cuda.mem_get_info(device.index or 0)[0])
    except (RuntimeError, AssertionError, TypeError):
        return device.free_bytes


# --------------------------------------------------------------------------- precision and batch size
def amp_dtype(device: Device, precision: str | None = "auto") -> Any:
    """The autocast dtype for a model on ``device``, or None (float32, or the method's own CPU rule).

    On CUDA ``auto`` is bfloat16 where the GPU supports it (Ampere and newer: float32's
    range, so no overflow), else float16; ``bf16``/``fp16`` force one, ``fp32`` turns
    autocast off. On the CPU and MPS nothing changes: the methods keep their own
    measured CPU setting, so CPU outputs stay exactly as they were.
    """
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if not device.is_cuda or precision == "fp32":
        return None
    torch = _torch()
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    try:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    except (RuntimeError, AssertionError):
        return torch.float16


def dtype_name(dtype: Any) -> str:
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(dtype), "fp32")


def on_device(method: Any, device: Device, precision: str | None = "auto") -> Any:
    """Give a built method its mixed precision for ``device`` (attribute ``amp_dtype``); returns it."""
    dtype = amp_dtype(device, precision)
    if dtype is not None:
        method.amp_dtype = dtype
    return method


def build_on_device(name: str | None, weights: Any = None, device: "Device | str | None" = "cpu",
                    precision: str | None = "auto", **overrides: Any) -> Any:
    """``build_method`` on a resolved device, with the mixed precision that device gets."""
    from pathlib import Path

    from nucli.models.registry import build_method

    dev = resolve_device(device)
    amp_dtype(dev, precision)  # a bad --precision is a usage error before the model loads
    method = build_method(name, weights=Path(weights) if weights is not None else None, device=dev.name,
                          **overrides)
    return on_device(method, dev, precision)


def auto_batch_size(device: Device, tile_size: int, default: int) -> int:
    """Tiles per batch: the method's default on the CPU; on a GPU as many as its free memory holds."""
    free = free_bytes(device)
    if free is None:
        return max(1, int(default))
    per_tile = BYTES_PER_PIXEL * int(tile_size) ** 2
    return int(max(1, min(MAX_AUTO_BATCH, FREE_MEMORY_SHARE * free // per_tile)))


# --------------------------------------------------------------------------- a run on a device
def device_and_runner(device: Any, runner: Any = None) -> tuple[Device, Any]:
    """The resolved device (a DeviceError before anything is created) and the runner that carries it."""
    from nucli.parallel import Runner

    runner = runner or Runner.serial()
    dev = resolve_device(device, remote=runner.mode in ("scheduler", "slurm"))
    if runner.device is None:
        runner.device = dev
    return dev, runner


def method_for(method: str | None, weights: Any, dev: Device, precision: str | None, runner: Any,
               tta: bool | None = None) -> tuple[Any, Any]:
    """The method built here (on ``dev`` for a serial run; on the CPU, for its settings, when Dask workers
    build their own from the returned recipe) and that recipe (None for a serial run). ``tta``: flip
    test-time augmentation on (True), off (False) or as the weights say (None)."""
    from nucli.parallel import MethodRecipe

    if not runner.is_dask:
        return build_on_device(method, weights, dev, precision, tta=tta), None
    m = build_on_device(method, weights, CPU, tta=tta)
    return m, MethodRecipe.create(m.name, weights, runner.method_device(), precision, tta=tta)


def post_threads_for(dev: Device) -> int | None:
    """CPU threads that post-process a batch: up to 4 beside a GPU; on the CPU None (the pipeline's rule:
    1 while a model uses the cores, one per CPU for a method without a model step)."""
    import os

    return min(4, os.cpu_count() or 1) if dev.is_cuda and not dev.remote else None


def batch_for(dev: Device, store: Any, method: Any, batch_size: int | None) -> int:
    """``--batch-size``, else the method's default (CPU) or what free GPU memory holds."""
    if batch_size:
        return int(batch_size)
    default = int(method.config.batch_size or 1)
    return auto_batch_size(dev, store.tile_size, default) if dev.is_cuda and not dev.remote else default


# --------------------------------------------------------------------------- out of memory
def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error (CUDA's OutOfMemoryError, or MPS's RuntimeError)."""
    import sys

    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _release_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except RuntimeError:
        pass


class OomRetry:
    """Run the model on a batch; out of device memory -> halve it and retry that batch's halves.

    Once a batch of ``n`` tiles ran out of memory, later batches are cut to at most
    ``n // 2`` tiles too. The first halving is announced once (``warn``, a logging
    warning by default); a single tile that does not fit is a one-line ProcessingError.
    """

    def __init__(self, device_name: str = "the device", warn: Callable[[str], None] | None = None):
        self.device_name = device_name
        self.limit: int | None = None
        self.warned = False
        self._warn = warn or log.warning

    def compute(self, job: Any, method: Any, batch: Any, data: Any) -> Iterator[tuple[Any, Any]]:
        """Yields ``(sub_batch, job.compute(method, sub_data))`` covering every tile of ``batch``, each part
        as soon as it is computed (so what the model finished is written even if a later part fails)."""
        from nucli.parallel.work import Batch

        members = tuple(batch.members)
        size = len(members) if self.limit is None else min(len(members), self.limit)
        start = 0
        while start < len(members):
            n = min(size, len(members) - start)
            part = Batch(members[start:start + n], batch.extent)
            try:
                computed = job.compute(method, _rows(data, start, n, len(members)))
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
                if not is_out_of_memory(exc):
                    raise
                _release_cache()
                if n <= 1:
                    w, h = batch.extent
                    raise ProcessingError(
                        f"out of memory on {self.device_name} for a single {w}x{h} px tile; use a smaller "
                        "--tile-size or --device cpu (finished tiles are saved; rerun to resume)") from None
                size = max(1, n // 2)
                self.limit = size
                if not self.warned:
                    self.warned = True
                    self._warn(f"out of memory on {self.device_name} with a batch of {n} tiles; "
                               f"continuing with batches of {size} (set --batch-size to choose)")
                continue
            start += n
            yield part, computed
            del computed


def _rows(data: Any, start: int, n: int, total: int) -> Any:
    """Rows ``start:start+n`` of a batch's loaded data (the data itself when that is all of it)."""
    if start == 0 and n == total:
        return data
    try:
        return data[start:start + n]
    except TypeError:
        raise ProcessingError("out of device memory, and this batch's data cannot be split; "
                              "pass a smaller --batch-size") from None


# --------------------------------------------------------------------------- training
class TrainingDevice:
    """Where a training loop runs: networks and batches moved there, autocast, fp16 loss scaling.

    On the CPU (``device`` None or ``cpu``) every step is exactly the plain CPU loop:
    nothing moves, no autocast, ``step`` is ``loss.backward(); opt.step()``. On CUDA the
    forward pass and loss run under autocast (bf16, or fp16 with a GradScaler); validation
    runs with the networks moved back to the CPU (the validation functions are CPU code),
    and the loop hands its networks back on the CPU.
    """

    def __init__(self, device: "Device | str | None" = None, precision: str | None = "auto"):
        self.device = CPU if device is None else resolve_device(device)
        self.active = self.device.name != "cpu"
        self.dtype = amp_dtype(self.device, precision) if self.active else None
        self.scaler = None
        if self.active and dtype_name(self.dtype) == "fp16":
            self.scaler = _torch().amp.GradScaler("cuda")

    def modules(self, *modules: Any) -> None:
        if self.active:
            for m in modules:
                m.to(self.device.name)

    def batch(self, batch: Any) -> Any:
        """Tensors in ``batch`` (a tensor, dict, list or tuple of them) on the device."""
        if not self.active:
            return batch
        torch = _torch()
        if torch.is_tensor(batch):
            return batch.to(self.device.name, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self.batch(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.batch(v) for v in batch)
        return batch

    def autocast(self) -> Any:
        from contextlib import nullcontext

        if self.dtype is None:
            return nullcontext()
        return _torch().autocast(self.device.kind, dtype=self.dtype)

    def step(self, loss: Any, optimizer: Any) -> None:
        """Backward and optimizer step (loss-scaled in fp16)."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def on_cpu(self, *modules: Any) -> Any:
        """Context: ``modules`` on the CPU inside (validation), back on the device after."""
        from contextlib import contextmanager

        @contextmanager
        def moved():
            if not self.active:
                yield
                return
            for m in modules:
                m.to("cpu")
            try:
                yield
            finally:
                for m in modules:
                    m.to(self.device.name)

        return moved()

    def release(self, *modules: Any) -> None:
        """Hand the networks back on the CPU (what the rest of training and export expect)."""
        if self.active:
            for m in modules:
                m.to("cpu")
            _release_cache()


# --------------------------------------------------------------------------- Dask workers
def worker_device(spec: str) -> str:
    """The device a model is built on inside a process: ``cuda`` (one GPU per worker) -> ``cuda:k``.

    ``auto`` is that where the worker sees a GPU, else ``cpu``.
    In a Dask worker whose name is an integer (a LocalCluster's workers are 0..N-1) that is
    GPU ``name mod count``; elsewhere ``cuda:0``. Any other spec is returned unchanged.
    """
    if spec == "auto":
        spec = PER_WORKER if cuda_count() else "cpu"
    if spec != PER_WORKER:
        return spec
    count = cuda_count()
    if count == 0:
        return "cpu"
    k = 0
    try:
        from distributed import get_worker

        digits = re.search(r"(\d+)$", str(get_worker().name))  # LocalCluster: 0..N-1; jobqueue: ...-0-3
        k = int(digits.group(1)) if digits else 0
    except (ImportError, ValueError):  # not in a Dask worker
        pass
    index = k % count
    try:
        _torch().cuda.set_device(index)
    except RuntimeError:
        pass
    return f"cuda:{index}"


def worker_devices(workers: int, device: Device) -> Sequence[str]:
    """The GPUs ``workers`` local Dask workers are pinned to (one each while there are enough)."""
    count = max(1, device.count)
    return [f"cuda:{k % count}" for k in range(workers)]


__all__ = [
    "CHOICES", "CPU", "PER_WORKER", "PRECISIONS", "Device", "DeviceError", "OomRetry", "TrainingDevice", "amp_dtype",
    "auto_batch_size", "available_devices", "batch_for", "build_on_device", "cuda_count", "device_and_runner",
    "dtype_name", "free_bytes", "is_out_of_memory", "method_for", "on_device", "post_threads_for", "resolve_device",
    "worker_device", "worker_devices",
]
