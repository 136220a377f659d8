"""Who may write a run store: a lock file beside it, and a short lock for a stage's setup."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from nucli.errors import StoreError
from nucli.parallel.work import Shard

log = logging.getLogger("nucli.parallel")


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
