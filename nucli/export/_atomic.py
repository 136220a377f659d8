"""Atomic output: write to a temporary sibling, then ``os.replace`` onto the target."""

from __future__ import annotations

import gzip
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any

from nucli.errors import InputError


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


class AtomicFile:
    """A file that appears at ``path`` only on :meth:`commit` (text or binary, optionally gzipped).

    Gzip output carries no file name or time stamp, so equal content gives equal bytes.
    """

    def __init__(self, path: Path, *, binary: bool = False, gz: bool = False, newline: str | None = None):
        self.path = Path(path)
        self.tmp = _temp_name(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._raw: IO[Any] = open(self.tmp, "xb")  # normal permissions (umask), unlike mkstemp
        except OSError as exc:
            raise InputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
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
        self._close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        try:
            self._close()
        except Exception:  # noqa: BLE001 - best effort on the error path
            pass
        self.tmp.unlink(missing_ok=True)


def temp_dir_for(path: Path) -> Path:
    """A fresh temporary directory beside ``path`` (for Zarr outputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
