"""Atomic output: write to a temporary sibling, then ``os.replace`` onto the target.

A temporary sibling of ``OUT`` is named ``.OUT.<12 hex digits>.tmp`` (``.old`` for the output being
replaced) and is held with ``flock`` while it is written. A killed run leaves it behind; the next run that
writes ``OUT`` removes such leftovers (:func:`remove_stale_temps`): only names of that pattern (or of the
``tempfile`` pattern older nucli versions used, ``.OUT.<8 characters>.tmp``/``.png``), beside ``OUT``, not
held by a live process and not modified for :data:`STALE_AFTER_S` seconds.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import IO, Any

from nucli.errors import InputError

log = logging.getLogger("nucli.export")

STALE_AFTER_S = 10.0
"""A leftover temporary file untouched for this long (and not held) is stale; one being written is held, and
the age covers the instant between its creation and its lock."""
_TEMP_PATTERN = r"\.{name}\.(?:[0-9a-f]{{12}}\.(?:tmp|old)|[a-z0-9_]{{8}}\.(?:tmp|png))"


def check_writable(path: Path) -> None:
    """Fail before any work when ``path``'s folder cannot exist (a file in the way, no permission)."""
    probe = Path(path).absolute().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot write {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: no write permission in {probe}")


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def hold(path: Path) -> int | None:
    """Open ``path`` (a file or folder) and hold an exclusive ``flock`` on it: it is being written, so no
    other run takes it for a leftover. Returns the descriptor (None where the file system has no flock)."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` that killed runs left (see the module docstring); returns them."""
    path = Path(path)
    pattern = re.compile(_TEMP_PATTERN.format(name=re.escape(path.name)))
    try:
        entries = [e for e in os.scandir(path.parent) if pattern.fullmatch(e.name)]
    except OSError:
        return []
    removed = []
    now = time.time()
    for entry in entries:
        try:
            st = os.lstat(entry.path)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or now - st.st_mtime < STALE_AFTER_S:
            continue
        fd = hold(Path(entry.path))
        if fd is None:  # held by a run that is writing it (or it cannot be opened): not ours to remove
            continue
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            release(fd)
    if removed:
        log.info("removed %d temporary file(s) a killed run left beside %s", len(removed), path)
    return removed


class AtomicFile:
    """A file that appears at ``path`` only on :meth:`commit` (text or binary, optionally gzipped).

    Gzip output carries no file name or time stamp, so equal content gives equal bytes.
    """

    def __init__(self, path: Path, *, binary: bool = False, gz: bool = False, newline: str | None = None):
        self.path = Path(path)
        self.tmp = _temp_name(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.path)
            self._raw: IO[Any] = open(self.tmp, "xb")  # normal permissions (umask), unlike mkstemp
        except OSError as exc:
            raise InputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._lock = hold(self.tmp)
        self._gz: gzip.GzipFile | None = None
        stream: IO[Any] = self._raw
        if gz:
            self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0)
            stream = self._gz
        if binary:
            self.handle: IO[Any] = stream
        else:
            import io

            self.handle = io.TextIOWrapper(stream, encoding="utf-8", newline=newline)
        self._closed = False

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.handle is not self._raw and self.handle is not self._gz:
            self.handle.flush()
            self.handle.detach()  # leave the underlying stream open for the steps below
        if self._gz is not None:
            self._gz.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()

    def commit(self) -> None:
        try:
            self._close()
            os.replace(self.tmp, self.path)
        finally:
            release(self._lock)
            self._lock = None

    def discard(self) -> None:
        try:
            self._close()
        except Exception:  # noqa: BLE001 - best effort on the error path
            pass
        self.tmp.unlink(missing_ok=True)
        release(self._lock)
        self._lock = None


def temp_dir_for(path: Path) -> Path:
    """A fresh temporary directory beside ``path`` (for Zarr outputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_name(path)
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, path: Path) -> None:
    """Move directory ``tmp`` onto ``path``, replacing an existing file or directory there."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        old = _temp_name(path).with_suffix(".old")
        os.replace(path, old)
        os.replace(tmp, path)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)
