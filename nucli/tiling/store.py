"""The run store: a Zarr group on disk that is the hand-off between subcommands.

Layout (``RUN.zarr``; every array has one chunk per tile along axis 0)::

    attrs["nucli"]          metadata dict (see ``RunStore.meta``): format version,
                            nucli version, source path + fingerprint, level-0 size,
                            source/working µm per px, downsample, working size,
                            tile size, overlap, grid starts, stage settings
    tiles      uint8  (N, T, T, C)   tile pixels at the working resolution (C=3, RGB)
    index      int32  (N, 2)         (row, col) of each stored tile in the grid
    origin     int64  (N, 2)         (x, y) of each tile, working px
    origin_level0 float64 (N, 2)     (x, y) of each tile, level-0 px
    done/<stage> uint8 (N,)          1 when the stage has finished that tile
    <stage arrays>                   e.g. ``labels`` int32 (N, T, T), ``enhanced``

Only tiles that touch tissue are stored (N <= rows*cols). Writes of different
tiles touch different chunk files, so several processes (``--shard i/n``) can
fill one store; a tile is "done" only after its data is written.

Every write leaves its chunk file on disk, even an all-zero one (stores made so
say ``"chunks_always_written": true`` in their metadata), so a chunk file deleted
from a finished tile is told apart from an empty tile: :meth:`RunStore.lost_tiles`.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from nucli.errors import OutputExistsError, StoreError
from nucli.tiling.grid import TileGrid

FORMAT_VERSION = 1
ATTR_KEY = "nucli"
ALL_CHUNKS_KEY = "chunks_always_written"
_WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


SCHEMA: dict[str, tuple[str, tuple]] = {
    "tiles": ("uint8", ("T", "T", "C")),
    "index": ("int32", (2,)),
    "origin": ("int64", (2,)),
    "origin_level0": ("float64", (2,)),
    "labels": ("int32", ("T", "T")),
    "scores": ("float32", (None,)),
    "enhanced": ("uint8", ("T", "T")),
}
"""dtype and shape after the tile axis (T: tile size, C: channels, None: any) of every array a stage reads;
``done/<stage>`` records are uint8 of shape (N,)."""


def _zarr():
    import zarr

    return zarr


MAX_WORKING_SIDE = 1 << 22
"""Largest working-resolution width/height a store may record (beyond any slide)."""


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_size(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x, 1) and x <= MAX_WORKING_SIDE for x in v)


def _is_positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a store's metadata (the fields every stage relies on), or None."""
    if not _is_int(meta.get("n_tiles")):
        return "n_tiles is not a count"
    if not _is_int(meta.get("tile_size"), 1):
        return "tile_size is not a positive integer"
    if not (_is_int(meta.get("overlap")) and meta["overlap"] < meta["tile_size"]):
        return "overlap is not an integer in [0, tile_size)"
    if not _is_size(meta.get("working_size")):
        return "working_size is not [width, height]"
    if "channels" in meta and not _is_int(meta["channels"], 1):
        return "channels is not a positive integer"
    if meta.get("level0_size") is not None and not _is_size(meta["level0_size"]):
        return "level0_size is not [width, height]"
    for key in ("downsample", "source_mpp", "working_mpp"):
        if meta.get(key) is not None and not _is_positive(meta[key]):
            return f"{key} is not a positive number"
    stages = meta.get("stages")
    if stages is not None and not (isinstance(stages, dict) and all(isinstance(v, dict) for v in stages.values())):
        return "stages is not a table of settings"
    source = meta.get("source")
    if source is not None and not isinstance(source, dict):
        return "source is not a table"
    rows, cols = TileGrid(*meta["working_size"], meta["tile_size"], meta["overlap"]).shape
    if meta["n_tiles"] > rows * cols:
        return f"{meta['n_tiles']} tiles recorded for a grid of {rows * cols}"
    return None


_REDO = {
    "tiles": "rerun `nucli tile` (or `nucli segment` on the slide) with the same options to write that tile again",
    "labels": "rerun `nucli segment` with the same options to segment that tile again",
}
"""How a deleted chunk file of an array is computed again (see :meth:`RunStore.lost_tiles`)."""


class _CheckedArray:
    """A store array whose reads turn a chunk file that cannot be decoded (flipped bytes, emptied, cut short)
    into a one-line :class:`StoreError` naming the store, the array, the tile and the file; writes and
    everything else go to the Zarr array."""

    def __init__(self, store: "RunStore", name: str, array: Any):
        self._store, self._name, self._array = store, name, array

    def __getitem__(self, key):
        try:
            return self._array[key]
        except (OSError, MemoryError, IndexError, KeyError, TypeError):
            raise
        except Exception as exc:  # noqa: BLE001 - codecs raise RuntimeError, ValueError, their own types
            raise self._store._damaged(self._name, self._array, key, exc) from None

    def __setitem__(self, key, value) -> None:
        self._array[key] = value

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self._array, attr)

    def __array__(self, dtype=None, copy=None):
        data = self[...]
        return np.asarray(data, dtype=dtype)


class RunStore:
    """A nucli run store (a Zarr v3 group). Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, group: Any):
        self.path = Path(path)
        self._g = group

    # ------------------------------------------------------------------ open/create
    @classmethod
    def create(
        cls,
        path: Path,
        meta: dict[str, Any],
        n_tiles: int,
        tile_size: int,
        channels: int = 3,
        overwrite: bool = False,
    ) -> "RunStore":
        """Create an empty store for ``n_tiles`` tiles. ``meta`` goes to attrs."""
        zarr = _zarr()
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        g = zarr.open_group(store=str(path), mode="w")
        n = max(int(n_tiles), 0)
        chunk_n = 1
        g.create_array("tiles", shape=(n, tile_size, tile_size, channels),
                       chunks=(chunk_n, tile_size, tile_size, channels), dtype="uint8", fill_value=0)
        g.create_array("index", shape=(n, 2), chunks=(max(n, 1), 2), dtype="int32", fill_value=0)
        g.create_array("origin", shape=(n, 2), chunks=(max(n, 1), 2), dtype="int64", fill_value=0)
        g.create_array("origin_level0", shape=(n, 2), chunks=(max(n, 1), 2), dtype="float64", fill_value=0)
        full = dict(meta)
        full.setdefault("format_version", FORMAT_VERSION)
        full["n_tiles"] = n
        full["tile_size"] = int(tile_size)
        full["channels"] = int(channels)
        full.setdefault("stages", {})
        full[ALL_CHUNKS_KEY] = True
        g.attrs[ATTR_KEY] = full
        return cls(path, g)

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> "RunStore":
        """Open an existing store (``mode`` 'r' or 'r+'); clear errors when it isn't one."""
        zarr = _zarr()
        path = Path(path)
        if not path.exists():
            raise StoreError(f"run store not found: {path}")
        if not path.is_dir():
            raise StoreError(f"{path} is not a run store (expected a .zarr directory)")
        try:
            g = zarr.open_group(store=str(path), mode=mode)
            meta = dict(g.attrs.get(ATTR_KEY) or {})
        except Exception as exc:  # zarr raises many types for broken groups
            raise StoreError(f"{path} is not a readable run store ({type(exc).__name__})") from None
        if not meta:
            raise StoreError(f"{path} is a Zarr group but not a nucli run store (no 'nucli' attributes)")
        version = meta.get("format_version")
        if not isinstance(version, int):
            raise StoreError(f"{path}: run store metadata is damaged (format_version missing)")
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{path} was written by a newer nucli (store format {version}, this nucli reads "
                f"<= {FORMAT_VERSION}); upgrade nucli"
            )
        problem = _meta_problem(meta)
        if problem:
            raise StoreError(f"{path}: run store metadata is damaged ({problem}); pass --overwrite to redo the run")
        store = cls(path, g)
        store._check_arrays()
        return store

    def _check_arrays(self) -> None:
        """Every array nucli reads has the dtype and shape of the schema (:data:`SCHEMA`; an edited store gives
        a one-line error, never a silently different result), and the tile positions are on disk."""
        meta = self.meta
        n, t = meta["n_tiles"], meta["tile_size"]
        c = meta.get("channels", 3)
        names = [name for name in SCHEMA if self.has(name)]
        if self.has("done"):
            try:
                names += [f"done/{k}" for k in self._g["done"].array_keys()]
            except Exception:  # noqa: BLE001 - 'done' that is not a group
                raise StoreError(f"{self.path}: run store is damaged ('done' is not a group of done records); "
                                 "pass --overwrite to redo the run") from None
        for name in names:
            dtype, tail = SCHEMA.get(name, ("uint8", ()))
            want = (n, *[{"T": t, "C": c}.get(v, v) for v in tail])
            arr = self._g[name]
            shape = tuple(arr.shape)
            if (np.dtype(arr.dtype) != np.dtype(dtype) or len(shape) != len(want)
                    or any(w is not None and s != w for s, w in zip(shape, want))):
                spell = "(" + ", ".join("K" if w is None else str(w) for w in want) + ")"
                raise StoreError(f"{self.path}: run store is damaged (array '{name}' is {arr.dtype} of shape "
                                 f"{shape}, expected {dtype} {spell}); pass --overwrite to redo the run")
        if not meta.get(ALL_CHUNKS_KEY) or not n:
            return
        for name in ("index", "origin", "origin_level0"):
            key = self._g[name].metadata.encode_chunk_key((0, 0)) if self.has(name) else None
            if key is not None and not (self.path / name / key).is_file():
                raise StoreError(f"{self.path}: the tile table '{name}' is missing (files deleted from the store); "
                                 "pass --overwrite to redo the run")

    def reload(self) -> None:
        """Re-read the group (metadata written by another process since this one opened it)."""
        self._g = _zarr().open_group(store=str(self.path), mode="r" if self._g.read_only else "r+")

    # ------------------------------------------------------------------ metadata
    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._g.attrs.get(ATTR_KEY) or {})

    def update_meta(self, **fields: Any) -> None:
        meta = self.meta
        meta.update(fields)
        self._g.attrs[ATTR_KEY] = meta

    @property
    def n_tiles(self) -> int:
        return int(self.meta["n_tiles"])

    @property
    def tile_size(self) -> int:
        return int(self.meta["tile_size"])

    @property
    def overlap(self) -> int:
        return int(self.meta["overlap"])

    @property
    def grid(self) -> TileGrid:
        m = self.meta
        w, h = m["working_size"]
        return TileGrid(int(w), int(h), int(m["tile_size"]), int(m["overlap"]))

    def stage_meta(self, stage: str) -> dict[str, Any] | None:
        return (self.meta.get("stages") or {}).get(stage)

    def set_stage_meta(self, stage: str, settings: dict[str, Any], overwrite: bool = False) -> None:
        """Record the settings of a stage; refuse to mix settings in one store.

        If the stage already ran with different settings, raise unless
        ``overwrite`` (then that stage's done records are reset).
        """
        meta = self.meta
        stages = dict(meta.get("stages") or {})
        old = stages.get(stage)
        if old is not None and old != settings:
            if not overwrite:
                changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise StoreError(
                    f"{self.path}: stage '{stage}' already ran with other settings "
                    f"({', '.join(changed)} differ); pass --overwrite to redo it"
                )
            self.reset_done(stage)
        stages[stage] = settings
        meta["stages"] = stages
        self._g.attrs[ATTR_KEY] = meta

    # ------------------------------------------------------------------ arrays
    def array(self, name: str):
        """Array ``name``; writes through it leave a chunk file even when the chunk is all fill value; a chunk
        that cannot be decoded is a one-line :class:`StoreError` (see :meth:`_damaged`)."""
        try:
            return _CheckedArray(self, name, self._g[name].with_config(_WRITE_EVERY_CHUNK))
        except KeyError:
            raise StoreError(f"{self.path}: missing array '{name}' (store incomplete or damaged)") from None

    def _damaged(self, name: str, arr: Any, key: Any, exc: BaseException) -> StoreError:
        """The error for a chunk of ``name`` that cannot be decoded, naming its file and how to recover.

        A damaged chunk is never taken for a tile to compute again (which would need every chunk decoded at
        each rerun): the message names the file; deleting it makes the tile missing, and the stage that
        wrote it (``tile``, ``segment``) writes missing tiles again."""
        why = " ".join(str(exc).split())[:120] or type(exc).__name__
        tile = self._bad_chunk(arr, key)
        where = ""
        if tile is not None:
            rest = (0,) * (arr.ndim - 1)
            where = f" for tile {tile} (file {name}/{arr.metadata.encode_chunk_key((tile, *rest))})"
        redo = _REDO.get(name) if tile is not None else None
        if tile is not None and name.startswith("done/"):  # a deleted done record: the tile is not done
            redo = f"rerun `nucli {name[5:]}` with the same options to compute that tile again"
        fix = f"delete that file and {redo}, or pass --overwrite to redo the run" if redo else \
            "pass --overwrite to redo the run"
        return StoreError(f"{self.path}: the run store is damaged: the data of array '{name}'{where} cannot be "
                          f"decoded ({type(exc).__name__}: {why}); {fix}")

    @staticmethod
    def _bad_chunk(arr: Any, key: Any) -> int | None:
        """The first tile (chunk along axis 0) of ``arr`` read by ``key`` that cannot be decoded, or None."""
        first = key[0] if isinstance(key, tuple) and key else key
        if isinstance(first, (int, np.integer)):
            candidates = [int(first) % max(arr.shape[0], 1)]
        elif isinstance(first, slice) or first is Ellipsis:
            candidates = list(range(*(first if isinstance(first, slice) else slice(None)).indices(arr.shape[0])))
        else:
            return None
        step = arr.chunks[0] if arr.chunks and arr.chunks[0] else 1
        for i in candidates[::step] if step > 1 else candidates:
            try:
                arr[i]
            except Exception:  # noqa: BLE001
                return i if step == 1 else None
        return None

    def has(self, name: str) -> bool:
        try:
            self._g[name]
            return True
        except KeyError:
            return False

    def ensure_array(self, name: str, tile_shape: tuple[int, ...], dtype: str, fill_value: Any = 0):
        """Create ``name`` with shape ``(N, *tile_shape)``, one chunk per tile, if absent."""
        if self.has(name):
            arr = self._g[name]
            if tuple(arr.shape[1:]) != tuple(tile_shape) or np.dtype(arr.dtype) != np.dtype(dtype):
                raise StoreError(
                    f"{self.path}: array '{name}' has shape {arr.shape[1:]}/{arr.dtype}, "
                    f"expected {tile_shape}/{dtype}; pass --overwrite to redo this stage"
                )
            return arr
        n = self.n_tiles
        return self._g.create_array(name, shape=(n, *tile_shape), chunks=(1, *tile_shape),
                                    dtype=dtype, fill_value=fill_value)

    def read(self, name: str, i: int) -> np.ndarray:
        return np.asarray(self.array(name)[i])

    def write(self, name: str, i: int, value: np.ndarray) -> None:
        self.array(name)[i] = value

    def read_tile(self, i: int) -> np.ndarray:
        return self.read("tiles", i)

    def origins(self) -> np.ndarray:
        return np.asarray(self.array("origin")[:])

    def indices(self) -> np.ndarray:
        return np.asarray(self.array("index")[:])

    # ------------------------------------------------------------------ done records
    def _done_array(self, stage: str):
        name = f"done/{stage}"
        if not self.has(name):
            n = self.n_tiles
            return self._g.create_array(name, shape=(n,), chunks=(1,), dtype="uint8", fill_value=0)
        return self._g[name]

    def done(self, stage: str) -> np.ndarray:
        """Boolean vector: which tiles have finished ``stage``."""
        if not self.has(f"done/{stage}"):
            return np.zeros(self.n_tiles, dtype=bool)
        return np.asarray(_CheckedArray(self, f"done/{stage}", self._g[f"done/{stage}"])[:]).astype(bool)

    def init_done(self, stage: str) -> None:
        """Create the all-zero done record of ``stage`` now (before parallel writers start)."""
        self._done_array(stage)

    def mark_done(self, stage: str, i: int) -> None:
        self._done_array(stage)[i] = 1

    def reset_done(self, stage: str) -> None:
        if self.has(f"done/{stage}"):
            del self._g[f"done/{stage}"]

    def is_complete(self, stage: str) -> bool:
        return bool(self.done(stage).all())

    def unmark_done(self, stage: str, indices) -> None:
        """Mark tiles as not done (they are computed again by the next run)."""
        if len(indices) and self.has(f"done/{stage}"):
            arr = self._g[f"done/{stage}"]
            for i in indices:
                arr[int(i)] = 0

    def lost_tiles(self, name: str, stage: str) -> np.ndarray:
        """Tiles done for ``stage`` whose chunk of array ``name`` is gone from disk (deleted files).

        Only stores whose every write leaves a chunk file can tell (see the module
        docstring); for older stores this is always empty.
        """
        done = np.flatnonzero(self.done(stage))
        if not self.meta.get(ALL_CHUNKS_KEY) or not len(done):
            return np.zeros(0, np.int64)
        if not self.has(name):
            return done.astype(np.int64)
        arr = self._g[name]
        rest = (0,) * (arr.ndim - 1)
        root = self.path / name
        lost = [i for i in done if not (root / arr.metadata.encode_chunk_key((int(i), *rest))).is_file()]
        return np.asarray(lost, np.int64)
