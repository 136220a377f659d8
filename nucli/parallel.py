"""Running per-tile work on many cores and machines: the one place that knows Dask.

A :class:`Runner` is made once per command from its options (:func:`make_runner`)
and passed to the library function that needs it; nothing here is global.
Modes:

* ``serial``: this process. Reading, the model and post-processing overlap in a
  small thread pipeline (a reader thread loads batch k+1 and a post-processing
  thread finishes batch k-1 while the model runs batch k), with bounded queues.
* ``local``: a ``dask.distributed`` LocalCluster on 127.0.0.1 with ``--workers``
  processes of ``--threads`` threads each.
* ``scheduler``: an existing ``dask.distributed`` scheduler (``--scheduler
  tcp://host:port`` or a scheduler JSON file); its workers must see the run
  store at the same path and have nucli installed.
* ``slurm``: a dask-jobqueue ``SLURMCluster`` built from ``--cluster-config``.

Work is a list of :class:`Batch` es (tile indices of equal in-image size) and a
:class:`TileJob` that loads, computes and writes one batch. In the Dask modes
each batch is one task that reads its tiles from the Zarr run store, runs the
method and writes the results back into the store on the worker; the client
only receives tile counts. At most ``max_in_flight`` batches are submitted at a
time (backpressure), so memory does not grow with the slide. The method is built
once per worker process from a :class:`MethodRecipe` (cached by method name and
weights hash) or, for a method object without a recipe, sent once per worker.

Also here: :class:`Shard` (``--shard i/n``: every n-th tile, so independent
processes fill one store) and :class:`StoreLock` (two writers of one store
without ``--shard`` is an error; a lock left by a dead process is taken over).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from nucli.errors import InputError, NotAvailableError, ProcessingError, StoreError, UsageError

log = logging.getLogger("nucli.parallel")

MODES = ("serial", "local", "scheduler", "slurm")


# --------------------------------------------------------------------------- work units
@dataclass(frozen=True)
class Batch:
    """Tiles processed together: store indices whose in-image size is ``extent`` = (w, h)."""

    members: tuple[int, ...]
    extent: tuple[int, int]


def plan_batches(todo: Sequence[int], extents: np.ndarray, batch_size: int) -> list[Batch]:
    """Cut the pending tiles (in order) into chunks of ``batch_size``, each split by in-image size.

    A method never sees padding, so tiles of different sizes (the right and
    bottom edges of the slide) go to different batches.
    """
    out: list[Batch] = []
    todo = [int(i) for i in todo]
    bs = max(1, int(batch_size))
    for k in range(0, len(todo), bs):
        groups: dict[tuple[int, int], list[int]] = {}
        for i in todo[k : k + bs]:
            groups.setdefault((int(extents[i][0]), int(extents[i][1])), []).append(i)
        out.extend(Batch(tuple(m), e) for e, m in groups.items())
    return out


class TileJob:
    """What to do with one batch, split in three steps so they can overlap.

    ``load`` reads from the store (I/O), ``compute`` runs the model, ``finish``
    post-processes and writes the results and the done records. All three must
    be safe to run on a worker that opened the store itself; the object is
    pickled to Dask workers, so keep it small and importable.
    """

    stage: str = ""

    def load(self, store: Any, batch: Batch) -> Any:
        raise NotImplementedError

    def compute(self, method: Any, data: Any) -> Any:
        raise NotImplementedError

    def finish(self, store: Any, method: Any, batch: Batch, computed: Any) -> None:
        raise NotImplementedError

    def run(self, store: Any, method: Any, batch: Batch) -> int:
        self.finish(store, method, batch, self.compute(method, self.load(store, batch)))
        return len(batch.members)


# --------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    """``--shard i/n``: tiles whose store index is ``i`` modulo ``n`` (0-based ``i``)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: "str | Shard | None") -> "Shard | None":
        if text is None or isinstance(text, Shard):
            return text
        parts = str(text).strip().split("/")
        try:
            i, n = (int(p) for p in parts)
        except ValueError:
            i, n = -1, 0
        if len(parts) != 2 or n < 1 or not 0 <= i < n:
            raise UsageError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4 ... 3/4 "
                             "(with a SLURM array --array=0-3 use --shard $SLURM_ARRAY_TASK_ID/4)")
        return cls(i, n)

    def select(self, tiles: np.ndarray) -> np.ndarray:
        """The tiles of ``tiles`` (store indices) that belong to this shard."""
        tiles = np.asarray(tiles)
        return tiles[tiles % self.count == self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# --------------------------------------------------------------------------- locks
def _pid_alive(pid: int, started: float | None = None) -> bool:
    """Is ``pid`` a running process (and, if known, the one that started at ``started``)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if started is None:
        return True
    try:
        import psutil

        return abs(psutil.Process(pid).create_time() - float(started)) < 2.0
    except Exception:  # noqa: BLE001 - psutil missing or the process just ended
        return True


def _start_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001
        return None


_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}
_UNLOCKED = -2  # no lock file could be made (read-only folder): nothing to release


class StoreLock:
    """Who writes a run store: one process without ``--shard``, or any number of shards.

    The lock is ``.<store name>.lock`` beside the store, held with ``flock``
    for the whole run: exclusively by a writer without ``--shard``, shared by
    ``--shard`` processes. The kernel drops the lock when its process dies
    (even by SIGKILL), so a lock file left by a dead process is simply taken
    over. The file also records the holder (pid, host, start) for the error
    message. On a file system without ``flock`` the record alone is checked.
    """

    def __init__(self, store_path: "str | os.PathLike[str]", shard: Shard | None = None):
        self.store_path = Path(store_path)
        self.shard = shard
        self.path = self.store_path.parent / f".{self.store_path.name}.lock"
        self._fd: int | None = None

    # -- records
    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "shard": str(self.shard) if self.shard else None}

    def holder(self) -> dict[str, Any] | None:
        """The record of the last exclusive holder, if any."""
        try:
            data = json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _holder_alive(self, rec: dict[str, Any] | None) -> bool:
        if not rec or not isinstance(rec.get("pid"), int):
            return False
        if rec.get("host") != socket.gethostname():
            return True  # cannot check another machine's processes
        if rec["pid"] == os.getpid():
            return True  # another writer inside this very process
        return _pid_alive(rec["pid"], rec.get("started"))

    def _conflict(self, rec: dict[str, Any] | None) -> StoreError:
        store = self.store_path
        live = self._holder_alive(rec)
        who = f"pid {rec['pid']} on {rec.get('host')}, since {rec.get('since')}" if live and rec else None
        if who and rec.get("host") != socket.gethostname():
            who += f"; if it is not running any more, delete {self.path}"
        if self.shard is None:
            if who:
                return StoreError(f"{store} is being written by another nucli process ({who}); wait for it to "
                                  "finish, or split the work between processes with --shard i/n")
            return StoreError(f"{store} is being filled by --shard processes; let them finish, or run this one "
                              "with --shard i/n as well")
        return StoreError(f"{store} is being written by a nucli process without --shard"
                          f"{f' ({who})' if who else ''}; wait for it to finish before starting shards")

    # -- acquire / release
    def acquire(self, retries: int = 20) -> "StoreLock":
        import fcntl

        mode = fcntl.LOCK_SH if self.shard else fcntl.LOCK_EX
        for attempt in range(retries):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                log.warning("cannot create the lock file %s (%s); a second writer of %s will not be detected",
                            self.path, exc.strerror, self.store_path)
                self._fd = _UNLOCKED
                return self
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if attempt < 2:  # someone may be probing or releasing right now
                    time.sleep(0.05)
                    continue
                raise self._conflict(self.holder()) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _NO_FLOCK:
                    raise
                return self._acquire_without_flock()
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file was removed by its last holder meanwhile: take the new one
                os.close(fd)
                continue
            self._fd = fd
            if self.shard is None:
                rec = self.holder()
                if rec and rec.get("pid") != os.getpid() and rec.get("host") == socket.gethostname():
                    log.info("taking over %s left by pid %s (no longer running)", self.path, rec.get("pid"))
                self._write_record()
            return self
        raise StoreError(f"could not lock {self.store_path} ({self.path} keeps changing); retry")

    def _acquire_without_flock(self) -> "StoreLock":
        rec = self.holder()
        if self._holder_alive(rec) and not (self.shard and rec and rec.get("shard")):
            raise self._conflict(rec)
        log.warning("file locks are not supported on %s; only the lock's pid record is checked", self.path.parent)
        if self.shard is None:
            self._write_record()
        self._fd = -1
        return self

    def _write_record(self) -> None:
        data = json.dumps(self._record()).encode()
        if self._fd is not None and self._fd >= 0:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        else:
            self.path.write_bytes(data)

    def release(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None or fd == _UNLOCKED:
            return
        if fd < 0:
            if self.shard is None:
                self.path.unlink(missing_ok=True)
            return
        try:
            # the last holder removes the file; a newcomer holding the old inode notices and retries
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        except OSError:
            pass  # other shards still hold it
        finally:
            os.close(fd)

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def setup_lock(store_path: "str | os.PathLike[str]", timeout: float = 120.0) -> Iterator[None]:
    """Serialise the short setup of a stage (settings, arrays) between processes sharing a store.

    Held on the store directory itself (no extra file); skipped with a debug
    note where directories cannot be locked.
    """
    import fcntl

    try:
        fd = os.open(store_path, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(f"{store_path} has been busy being set up by another process for "
                                     f"{timeout:.0f} s; retry") from None
                time.sleep(0.02)
            except OSError as exc:
                log.debug("cannot lock %s (%s); setting up without a lock", store_path, exc)
                break
        yield
    finally:
        os.close(fd)  # closing drops the lock


# --------------------------------------------------------------------------- method on workers
@dataclass(frozen=True)
class MethodRecipe:
    """How to build a method on a worker: registry name, weights file, device, config overrides.

    ``key`` names the built model in a worker's cache: the method name, the
    SHA-256 of its weights file, the device and the overrides.
    """

    name: str | None
    weights: str | None = None
    device: str = "cpu"
    overrides: tuple[tuple[str, Any], ...] = ()
    weights_sha256: str | None = None

    @classmethod
    def create(cls, name: str | None, weights: "str | os.PathLike[str] | None" = None, device: str = "cpu",
               **overrides: Any) -> "MethodRecipe":
        from nucli.models.registry import get_spec, sha256_of

        spec = get_spec(name)
        path = Path(weights) if weights is not None else spec.weights_path
        digest = sha256_of(path) if path is not None and path.is_file() else None
        return cls(spec.name, str(Path(weights).resolve()) if weights is not None else None, device,
                   tuple(sorted((k, v) for k, v in overrides.items() if v is not None)), digest)

    @property
    def key(self) -> str:
        extra = ",".join(f"{k}={v!r}" for k, v in self.overrides)
        return f"{self.name}:{(self.weights_sha256 or 'none')[:16]}:{self.device}:{extra}"

    def build(self) -> Any:
        from nucli.models.registry import build_method

        return build_method(self.name, weights=Path(self.weights) if self.weights else None, device=self.device,
                            **dict(self.overrides))


_CACHE_LOCK = threading.Lock()
_CACHE: "OrderedDict[str, Any]" = OrderedDict()
_BUILDS: dict[str, int] = {}
_CACHE_SIZE = 2


def cached_method(recipe: MethodRecipe) -> Any:
    """The method of ``recipe``, built at most once per worker process (a few most recent kept)."""
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

    method = cached_method(method_ref) if isinstance(method_ref, MethodRecipe) else method_ref
    store = RunStore.open(Path(store_path), mode="r+")
    return job.run(store, method, batch)


def _probe(store_path: str) -> dict[str, Any]:
    """What a worker sees: nucli's version and whether the store is there."""
    import nucli

    return {"nucli": getattr(nucli, "__version__", "?"), "store": os.path.isdir(store_path),
            "host": socket.gethostname()}


# --------------------------------------------------------------------------- SLURM
_NUCLI_SLURM_KEYS = ("jobs",)


def _slurm_keys() -> set[str]:
    import inspect

    from dask_jobqueue import core, slurm

    keys: set[str] = set()
    for fn in (slurm.SLURMJob.__init__, core.Job.__init__, core.JobQueueCluster.__init__):
        keys |= {p for p in inspect.signature(fn).parameters
                 if p not in ("self", "scheduler", "base_class_kwargs", "job_kwargs", "job_cls", "loop",
                              "asynchronous", "config_name", "n_workers", "host", "dashboard_address")}
    return keys


def load_cluster_config(path: "str | os.PathLike[str]") -> dict[str, Any]:
    """Read a SLURMCluster configuration (YAML or JSON) -> keyword arguments (+ nucli's ``jobs``).

    The file holds SLURMCluster's arguments at the top level (``cores``,
    ``memory``, ``walltime``, ``account``, ``queue``, ``job_extra_directives``,
    ...) or dask-jobqueue's own layout (``jobqueue: slurm: {...}``). Extra key:
    ``jobs`` (how many SLURM jobs to start; default: enough for ``--workers``,
    else 1).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--cluster-config {path}: file not found")
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"--cluster-config {path}: cannot read it ({exc.strerror})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml/json error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--cluster-config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                         f"({first})") from None
    if isinstance(data, dict) and isinstance(data.get("jobqueue"), dict):
        data = data["jobqueue"].get("slurm", data["jobqueue"])
    if not isinstance(data, dict) or not data:
        raise InputError(f"--cluster-config {path}: expected a mapping of SLURMCluster settings "
                         "(see examples/dask_jobqueue.yaml)")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    try:
        known = _slurm_keys()
    except ImportError:
        raise NotAvailableError("--cluster slurm needs dask-jobqueue; install it with `pip install dask-jobqueue`") \
            from None
    unknown = sorted(k for k in data if k not in known and k not in _NUCLI_SLURM_KEYS)
    if unknown:
        raise UsageError(f"--cluster-config {path}: unknown setting(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known | set(_NUCLI_SLURM_KEYS)))}")
    missing = [k for k in ("cores", "memory") if data.get(k) in (None, "")]
    if missing:
        raise UsageError(f"--cluster-config {path}: set {' and '.join(missing)} (per SLURM job)")
    jobs = data.get("jobs")
    if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
        raise UsageError(f"--cluster-config {path}: 'jobs' must be a whole number >= 1, got {jobs!r}")
    return data


def slurm_cluster(config: dict[str, Any], workers: int | None = None) -> tuple[Any, dict[str, int]]:
    """A (not yet scaled) SLURMCluster from :func:`load_cluster_config` output, and how to scale it."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise NotAvailableError("--cluster slurm needs dask-jobqueue; install it with `pip install dask-jobqueue`") \
            from None
    kwargs = {k: v for k, v in config.items() if k not in _NUCLI_SLURM_KEYS}
    try:
        cluster = SLURMCluster(**kwargs)
    except (TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--cluster-config: dask-jobqueue refused the settings ({first})") from None
    if config.get("jobs"):
        scale = {"jobs": int(config["jobs"])}
    elif workers:
        scale = {"n": int(workers)}
    else:
        scale = {"jobs": 1}
    return cluster, scale


# --------------------------------------------------------------------------- runner
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

    def describe(self) -> str:
        if self.mode == "local":
            return f"dask local: {self.workers} worker(s) x {self.threads} thread(s)"
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
            self._cluster = LocalCluster(n_workers=int(self.workers or os.cpu_count() or 1),
                                         threads_per_worker=int(self.threads or 1), processes=True,
                                         host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                         silence_logs=logging.ERROR)
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
                computed = job.compute(method, data)  # the model runs here while the threads read and write
                del data
                while len(posts) >= depth:
                    settle_oldest()
                posts.append((b, writer.submit(job.finish, store, method, b, computed)))
                del computed
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
) -> Runner:
    """A runner from the shared command-line options (validated now; a cluster starts on first use).

    No option: serial. ``--workers``/``--threads`` or ``--cluster local``: a
    local Dask cluster. ``--scheduler``: an existing one. ``--cluster slurm
    --cluster-config FILE``: dask-jobqueue.
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
        return Runner("scheduler", scheduler=str(scheduler), max_in_flight=max_in_flight)
    if cluster == "slurm":
        if cluster_config is None:
            raise UsageError("--cluster slurm needs --cluster-config FILE (see examples/dask_jobqueue.yaml)")
        return Runner("slurm", workers=workers, cluster_config=load_cluster_config(cluster_config),
                      max_in_flight=max_in_flight)
    if cluster == "local" or workers is not None or threads is not None:
        return Runner("local", workers=int(workers or os.cpu_count() or 1), threads=int(threads or 1),
                      max_in_flight=max_in_flight)
    return Runner("serial")


__all__ = [
    "Batch", "MethodRecipe", "Runner", "Shard", "StoreLock", "TileJob", "cached_method", "load_cluster_config",
    "make_runner", "method_builds", "plan_batches", "setup_lock", "slurm_cluster",
]
