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
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from nucli.errors import OutputExistsError, StoreError
from nucli.tiling.grid import TileGrid

FORMAT_VERSION = 1
ATTR_KEY = "nucli"


def _zarr():
    import zarr

    return zarr


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
        return cls(path, g)

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
        try:
            return self._g[name]
        except KeyError:
            raise StoreError(f"{self.path}: missing array '{name}' (store incomplete or damaged)") from None

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
        return np.asarray(self._g[f"done/{stage}"][:]).astype(bool)

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
