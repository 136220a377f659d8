"""The runner: serial thread pipeline or Dask (local cluster, existing scheduler, SLURM); methods on workers."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from nucli.errors import InputError, NotAvailableError, ProcessingError, UsageError
from nucli.parallel.slurm import load_cluster_config, slurm_cluster
from nucli.parallel.work import Batch, TileJob

log = logging.getLogger("nucli.parallel")

MODES = ("serial", "local", "scheduler", "slurm")


# --------------------------------------------------------------------------- method on workers
@dataclass(frozen=True)
class MethodRecipe:
    """How to build a method on a worker: registry name, weights file, device, config overrides.

    ``key`` names the built model in a worker's cache: the method name, the
    SHA-256 of its weights file, the device and the overrides. ``device``
    ``cuda`` (no index) means one GPU per worker (:func:`nucli.parallel.device.worker_device`);
    ``precision`` is the mixed precision on a GPU (``auto``, ``bf16``, ``fp16``, ``fp32``).
    """

    name: str | None
    weights: str | None = None
    device: str = "cpu"
    overrides: tuple[tuple[str, Any], ...] = ()
    weights_sha256: str | None = None
    precision: str = "auto"

    @classmethod
    def create(cls, name: str | None, weights: "str | os.PathLike[str] | None" = None, device: str = "cpu",
               precision: str | None = None, **overrides: Any) -> "MethodRecipe":
        from nucli.models.registry import get_spec, sha256_of

        spec = get_spec(name)
        path = Path(weights) if weights is not None else spec.weights_path
        digest = sha256_of(path) if path is not None and path.is_file() else None
        return cls(spec.name, str(Path(weights).resolve()) if weights is not None else None, str(device),
                   tuple(sorted((k, v) for k, v in overrides.items() if v is not None)), digest,
                   precision or "auto")

    @property
    def key(self) -> str:
        extra = ",".join(f"{k}={v!r}" for k, v in self.overrides)
        return f"{self.name}:{(self.weights_sha256 or 'none')[:16]}:{self.device}:{self.precision}:{extra}"

    def on_worker(self) -> "MethodRecipe":
        """This recipe with the device this process uses (``auto``/``cuda`` -> ``cpu`` or its own ``cuda:k``)."""
        from dataclasses import replace

        from nucli.parallel.device import worker_device

        device = worker_device(self.device)
        return self if device == self.device else replace(self, device=device)

    def build(self) -> Any:
        from nucli.parallel.device import build_on_device

        return build_on_device(self.name, self.weights, self.on_worker().device, self.precision,
                               **dict(self.overrides))


_CACHE_LOCK = threading.Lock()
_CACHE: "OrderedDict[str, Any]" = OrderedDict()
_BUILDS: dict[str, int] = {}
_CACHE_SIZE = 2


def cached_method(recipe: MethodRecipe) -> Any:
    """The method of ``recipe``, built at most once per worker process (a few most recent kept)."""
    recipe = recipe.on_worker()
    with _CACHE_LOCK:
        method = _CACHE.get(recipe.key)
        if method is None:
            method = recipe.build()
            _CACHE[recipe.key] = method
            _BUILDS[recipe.key] = _BUILDS.get(recipe.key, 0) + 1
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(recipe.key)
        return method


def method_builds() -> dict[str, int]:
    """How many times this process built each method (1 per worker is the contract)."""
    with _CACHE_LOCK:
        return dict(_BUILDS)


def _run_batch(job: TileJob, method_ref: Any, store_path: str, batch: Batch) -> int:
    """One Dask task: open the store, load, compute, write. Returns the number of tiles done."""
    from nucli.tiling.store import RunStore

    from nucli.parallel.device import OomRetry

    method = cached_method(method_ref) if isinstance(method_ref, MethodRecipe) else method_ref
    store = RunStore.open(Path(store_path), mode="r+")
    data = job.load(store, batch)
    for part, computed in OomRetry(str(getattr(method, "device", "the device"))).compute(job, method, batch, data):
        job.finish(store, method, part, computed)
    return len(batch.members)


def _probe(store_path: str) -> dict[str, Any]:
    """What a worker sees: nucli's version and whether the store is there."""
    import nucli

    return {"nucli": getattr(nucli, "__version__", "?"), "store": os.path.isdir(store_path),
            "host": socket.gethostname()}


@dataclass
class Runner:
    """Where per-tile work runs. Use as a context manager; a cluster starts on first use."""

    mode: str = "serial"
    workers: int | None = None
    threads: int | None = None
    scheduler: str | None = None
    cluster_config: dict[str, Any] | None = None
    max_in_flight: int | None = None
    prefetch: int = 2
    connect_timeout: float = 15.0
    device: Any = None  # nucli.parallel.device.Device the work runs on (None: the CPU)
    say: Callable[[str], None] | None = None  # how the serial runner announces a halved batch (once)
    _client: Any = field(default=None, repr=False)
    _cluster: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown runner mode '{self.mode}'; known: {', '.join(MODES)}")

    # -- construction helpers
    @classmethod
    def serial(cls) -> "Runner":
        return cls("serial")

    @classmethod
    def local(cls, workers: int = 2, threads: int = 1, **kw: Any) -> "Runner":
        return cls("local", workers=workers, threads=threads, **kw)

    @classmethod
    def connect(cls, address: str, **kw: Any) -> "Runner":
        return cls("scheduler", scheduler=address, **kw)

    @property
    def is_dask(self) -> bool:
        return self.mode != "serial"

    @property
    def per_worker_gpu(self) -> bool:
        """A local cluster on CUDA: each worker process is pinned to its own GPU."""
        return (self.mode == "local" and self.device is not None and self.device.is_cuda
                and not self.device.pinned)

    def method_device(self) -> str:
        """The device string a method is built with by this runner's workers."""
        if self.device is None:
            return "cpu"
        if self.device.remote:
            from nucli.parallel.device import PER_WORKER

            return PER_WORKER if self.device.name == "cuda" else self.device.name
        if self.per_worker_gpu:
            from nucli.parallel.device import PER_WORKER

            return PER_WORKER
        return self.device.name

    def describe(self) -> str:
        if self.mode == "local":
            pinned = ""
            if self.per_worker_gpu:
                from nucli.parallel.device import worker_devices

                pinned = f", one GPU per worker ({', '.join(worker_devices(int(self.workers or 1), self.device))})"
            return f"dask local: {self.workers} worker(s) x {self.threads} thread(s){pinned}"
        if self.mode == "scheduler":
            return f"dask scheduler {self.scheduler}"
        if self.mode == "slurm":
            return "dask-jobqueue SLURM"
        return "serial"

    # -- lifecycle
    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        with contextlib.suppress(Exception):
            if client is not None:
                client.close()
        with contextlib.suppress(Exception):
            if cluster is not None:
                cluster.close()

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` (started on first use); None in serial mode."""
        if self.mode == "serial":
            return None
        if self._client is None:
            self._start()
        return self._client

    def _start(self) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise NotAvailableError("parallel runs need dask.distributed; install it with "
                                    "`pip install distributed`") from None
        if self.mode == "local":
            n = int(self.workers or os.cpu_count() or 1)
            try:
                self._cluster = LocalCluster(n_workers=n, threads_per_worker=int(self.threads or 1), processes=True,
                                             host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                             silence_logs=logging.ERROR)
            except Exception as exc:  # noqa: BLE001 - distributed raises RuntimeError/OSError/TimeoutError
                raise ProcessingError(f"could not start {n} local Dask worker process(es) ({type(exc).__name__}: "
                                      f"{exc}); run without --workers, or start Python from a script file "
                                      "(worker processes re-import it)") from None
            self._client = Client(self._cluster)
        elif self.mode == "scheduler":
            address = str(self.scheduler)
            try:
                if address.endswith(".json") and Path(address).is_file():
                    self._client = Client(scheduler_file=address, timeout=f"{self.connect_timeout}s")
                else:
                    self._client = Client(address, timeout=f"{self.connect_timeout}s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise InputError(f"--scheduler {address}: cannot reach a dask scheduler there "
                                 f"({type(exc).__name__}); start one with `dask scheduler` or check the address") \
                    from None
        else:
            cluster, scale = slurm_cluster(self.cluster_config or {}, self.workers)
            self._cluster = cluster
            cluster.scale(**scale)
            self._client = Client(cluster)
            log.info("submitted SLURM jobs (%s); waiting for the first worker", scale)

    def _threads_total(self) -> int:
        client = self.client
        try:
            client.wait_for_workers(1, timeout=None if self.mode == "slurm" else 120)
        except TimeoutError:
            raise ProcessingError(f"{self.describe()}: no dask worker joined within 120 s; start workers with "
                                  f"`dask worker {self.scheduler}`") from None
        return max(1, sum(client.nthreads().values()))

    def check_workers(self, store_path: Path) -> None:
        """Fail early (one line) when workers cannot import nucli or do not see the store."""
        if self.mode == "local":
            return
        try:
            seen = self.client.run(_probe, str(store_path))
        except Exception as exc:  # noqa: BLE001 - whatever the worker raised while unpickling
            raise ProcessingError(f"dask workers cannot run nucli ({type(exc).__name__}: {exc}); install nucli "
                                  "in the workers' environment") from None
        blind = sorted(addr for addr, info in seen.items() if not info.get("store"))
        if blind:
            raise InputError(f"dask worker(s) {', '.join(blind)} do not see {store_path}; put the run store on a "
                             "file system shared by all workers")

    # -- the work
    def run(
        self,
        store: Any,
        job: TileJob,
        method: Any,
        batches: Sequence[Batch],
        *,
        recipe: MethodRecipe | None = None,
        advance: Callable[[int], None] = lambda n: None,
    ) -> int:
        """Process ``batches`` of ``store`` with ``job``; returns the number of tiles done."""
        if not batches:
            return 0
        if self.mode == "serial":
            return self._run_serial(store, job, method, batches, advance)
        return self._run_dask(store, job, method, batches, recipe, advance)

    def _run_serial(self, store: Any, job: TileJob, method: Any, batches: Sequence[Batch],
                    advance: Callable[[int], None]) -> int:
        from concurrent.futures import Future, ThreadPoolExecutor

        from nucli.parallel.device import OomRetry

        oom = OomRetry(str(getattr(method, "device", None) or (self.device.name if self.device else "the device")),
                       warn=self.say)

        depth = max(1, int(self.prefetch))
        loads: deque[tuple[Batch, Future]] = deque()
        posts: deque[tuple[Batch, Future]] = deque()
        it = iter(batches)
        done = 0
        reader = ThreadPoolExecutor(1, thread_name_prefix="nucli-read")
        writer = ThreadPoolExecutor(1, thread_name_prefix="nucli-post")

        def top_up() -> None:
            while len(loads) < depth:
                b = next(it, None)
                if b is None:
                    return
                loads.append((b, reader.submit(job.load, store, b)))

        def settle_oldest() -> None:
            nonlocal done
            b, f = posts.popleft()
            f.result()
            done += len(b.members)
            advance(len(b.members))

        try:
            top_up()
            while loads:
                b, f = loads.popleft()
                data = f.result()
                top_up()
                # the model runs here while the threads read the next batch and post-process the last
                for part, computed in oom.compute(job, method, b, data):
                    while len(posts) >= depth:
                        settle_oldest()
                    posts.append((part, writer.submit(job.finish, store, method, part, computed)))
                    del computed
                del data
                while posts and posts[0][1].done():
                    settle_oldest()
            while posts:
                settle_oldest()
        except BaseException:
            for _, f in loads:
                f.cancel()
            # what the model already finished is still written: a rerun starts after it
            while posts:
                try:
                    settle_oldest()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    log.debug("a pending write failed while stopping", exc_info=True)
            raise
        finally:
            reader.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True)
        return done

    def _run_dask(self, store: Any, job: TileJob, method: Any, batches: Sequence[Batch],
                  recipe: MethodRecipe | None, advance: Callable[[int], None]) -> int:
        from distributed import as_completed

        client = self.client
        store_path = str(Path(store.path).resolve())
        self.check_workers(Path(store_path))
        limit = int(self.max_in_flight or max(2, 2 * self._threads_total()))
        ref: Any = recipe if recipe is not None else client.scatter(method, broadcast=True, hash=False)
        it = iter(batches)
        pending = as_completed()
        futures: set[Any] = set()

        def submit(b: Batch) -> None:
            f = client.submit(_run_batch, job, ref, store_path, b, pure=False)
            futures.add(f)
            pending.add(f)

        done = 0
        try:
            for b in list(_take(it, limit)):
                submit(b)
            for f in pending:
                futures.discard(f)
                n = _result(f, self.describe())
                done += n
                advance(n)
                nxt = next(it, None)
                if nxt is not None:
                    submit(nxt)
        except BaseException:
            with contextlib.suppress(Exception):
                client.cancel(list(futures))
            raise
        return done


def _take(it: Iterator[Batch], n: int) -> Iterable[Batch]:
    for _ in range(n):
        b = next(it, None)
        if b is None:
            return
        yield b


def _result(future: Any, where: str) -> int:
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    try:
        return int(future.result())
    except KilledWorker:
        raise ProcessingError(f"{where}: a dask worker died on the same batch repeatedly (out of memory? try a "
                              "smaller --batch-size); finished tiles are saved, rerun to resume") from None
    except FutureCancelledError:
        raise ProcessingError(f"{where}: the work was cancelled (the cluster shut down?); finished tiles are "
                              "saved, rerun to resume") from None


def make_runner(
    *,
    workers: int | None = None,
    threads: int | None = None,
    scheduler: str | None = None,
    cluster: str | None = None,
    cluster_config: "str | os.PathLike[str] | None" = None,
    max_in_flight: int | None = None,
    device: Any = None,
) -> Runner:
    """A runner from the shared command-line options (validated now; a cluster starts on first use).

    No option: serial. ``--workers``/``--threads`` or ``--cluster local``: a
    local Dask cluster. ``--scheduler``: an existing one. ``--cluster slurm
    --cluster-config FILE``: dask-jobqueue. ``device`` (a resolved
    :class:`nucli.parallel.device.Device`): where the models run; a local cluster
    on CUDA pins each worker process to its own GPU (``--cluster local`` alone
    starts one worker per GPU).
    """
    cluster = getattr(cluster, "value", cluster)
    for name, value in (("--workers", workers), ("--threads", threads)):
        if value is not None and int(value) < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if cluster not in (None, "local", "slurm"):
        raise UsageError(f"--cluster {cluster!r}: expected local or slurm")
    if scheduler and cluster:
        raise UsageError("give either --scheduler (an existing cluster) or --cluster (start one), not both")
    if cluster_config is not None and cluster != "slurm":
        raise UsageError("--cluster-config is for --cluster slurm")
    if scheduler:
        if workers is not None or threads is not None:
            log.warning("--workers/--threads are ignored with --scheduler (the scheduler's workers are used)")
        return Runner("scheduler", scheduler=str(scheduler), max_in_flight=max_in_flight, device=device)
    if cluster == "slurm":
        if cluster_config is None:
            raise UsageError("--cluster slurm needs --cluster-config FILE (see examples/dask_jobqueue.yaml)")
        return Runner("slurm", workers=workers, cluster_config=load_cluster_config(cluster_config),
                      max_in_flight=max_in_flight, device=device)
    if cluster == "local" or workers is not None or threads is not None:
        gpus = int(getattr(device, "count", 0) or 0) if getattr(device, "is_cuda", False) else 0
        n = int(workers or gpus or os.cpu_count() or 1)
        if gpus and n > gpus:
            log.warning("--workers %d on %d GPU(s): workers share GPUs (one worker per GPU is usually fastest)",
                        n, gpus)
        return Runner("local", workers=n, threads=int(threads or 1), max_in_flight=max_in_flight, device=device)
    return Runner("serial", device=device)


__all__ = ["MODES", "MethodRecipe", "Runner", "cached_method", "make_runner", "method_builds"]
