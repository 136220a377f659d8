"""Tile a slide into a resumable run store (the library side of ``nucli tile``).

Order of work, so that a bad input leaves nothing behind:

1. open the slide (input errors), settle the pixel size, the grid and the
   settings that define the store;
2. look at the output: a compatible store is resumed (a complete one is left
   untouched), anything else is refused unless ``overwrite``;
3. find the tiles touching tissue (an empty mask is :class:`NoTissueError`);
4. create the store in a hidden temporary directory beside the output with all
   metadata, tile indices and origins, then rename it into place (atomic: a
   store is either absent or fully planned);
5. read and write the tiles, each tile's ``done/tile`` flag written after its
   pixels, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from nucli.errors import InputError, OutputExistsError, StoreError, UsageError
from nucli.export._atomic import check_writable
from nucli.tiling.grid import TileGrid, spread
from nucli.tiling.store import ATTR_KEY, FORMAT_VERSION, RunStore

log = logging.getLogger("nucli.tile")

STAGE = "tile"
MAX_TILE_SIZE = 8192
"""Largest tile edge (working px): a batch of such tiles already needs GiBs; beyond, a typo."""
# Settings that define a store's tiles: a rerun with other values is refused.
_KEY_SETTINGS = ("fingerprint", "source_mpp", "working_mpp", "downsample", "working_size",
                 "tile_size", "overlap", "tissue_mask")


@dataclass
class TileReport:
    """What a tiling run did (``tile_slide`` returns only ``store``)."""

    store: RunStore
    path: Path
    n_tiles: int
    grid_tiles: int
    written: int
    already_done: int
    status: str  # "created" | "resumed" | "complete"
    tissue_fraction: float | None
    source_mpp: float | None
    working_mpp: float | None
    downsample: float
    seconds: float
    auto_scale: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        extra = {"auto_zoom": self.auto_scale["zoom"],
                 "auto_median_nucleus_px": self.auto_scale["median_diameter_px"]} if self.auto_scale else {}
        return {
            "output": str(self.path),
            "status": self.status,
            "tiles": self.n_tiles,
            "grid_tiles": self.grid_tiles,
            "tiles_written": self.written,
            "tissue_fraction": self.tissue_fraction,
            "source_mpp": self.source_mpp,
            "working_mpp": self.working_mpp,
            "downsample": self.downsample,
            **extra,
            "seconds": round(self.seconds, 3),
        }


def tile_slide(
    source: Path,
    out: Path,
    *,
    mpp: float | None = None,
    mpp_target: float | None = None,
    method: str | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    tissue_mask: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    scale_method: Any = None,
) -> RunStore:
    """Tile ``source`` into the run store ``out`` and return it (see module docstring).

    ``mpp_target``, ``tile_size`` and ``overlap`` default to the method's config
    (``method`` defaults to the registry's default method).
    """
    return run_tiling(source, out, mpp=mpp, mpp_target=mpp_target, method=method, tile_size=tile_size,
                      overlap=overlap, tissue_mask=tissue_mask, overwrite=overwrite, progress=progress,
                      workers=workers, scale_method=scale_method).store


def run_tiling(
    source: Path,
    out: Path,
    *,
    mpp: float | None = None,
    mpp_target: float | None = None,
    method: str | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    tissue_mask: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    scale_method: Any = None,
) -> TileReport:
    """:func:`tile_slide` returning a :class:`TileReport`.

    ``mpp="auto"``: the slide's own pixel size when its metadata has one; otherwise
    a few tissue tiles are segmented at native resolution (with ``scale_method``, a
    built method, or ``method``'s shipped weights) and the slide is enlarged as far
    as the size of those nuclei calls for (:mod:`nucli.autoscale`).
    """
    from nucli.autoscale import AUTO, NATIVE
    from nucli.outputs import refuse_inputs

    t0 = time.perf_counter()
    source = Path(source).expanduser()
    out = Path(out).expanduser()
    refuse_inputs([("-o", out)], [("the slide", source)])
    auto = mpp == AUTO
    # no --mpp: an image without a pixel size gets `auto` when the method's weights search the zoom
    auto_default = mpp is None and mpp_target is None
    if mpp == NATIVE:
        mpp = None
    if auto and mpp_target is not None:
        raise UsageError("--mpp auto and --mpp-target do not go together (auto has no pixel size to aim from)")
    method_name, defaults = _method_defaults(
        method, need=auto or mpp_target is None or tile_size is None or overlap is None)
    if scale_method is not None:  # a built method (`segment --weights`): its own working pixel size
        defaults = {**defaults, "mpp": getattr(scale_method.config, "mpp", defaults.get("mpp"))}
    tile_size = int(tile_size if tile_size is not None else defaults.get("tile_size", 512))
    overlap = int(overlap if overlap is not None else defaults.get("overlap", 64))
    if not 16 <= tile_size <= MAX_TILE_SIZE:
        raise UsageError(f"--tile-size must be between 16 and {MAX_TILE_SIZE} px, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise UsageError(f"--overlap must be in [0, tile size {tile_size}), got {overlap}")

    created: list[Path] = []
    try:
        return _run_tiling(source, out, created, auto=auto, auto_default=auto_default, mpp=mpp, mpp_target=mpp_target, method_name=method_name,
                           defaults=defaults, tile_size=tile_size, overlap=overlap, tissue_mask=tissue_mask,
                           overwrite=overwrite, progress=progress, workers=workers, scale_method=scale_method,
                           t0=t0)
    except BaseException:
        for folder in reversed(created):  # only empty ones: never what another run put there meanwhile
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _make_parents(out: Path) -> list[Path]:
    """Create ``out``'s missing parent folders; the ones this call made, top first."""
    missing = []
    p = out.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
            made.append(folder)
        except FileExistsError:
            pass  # made by another run at the same moment
        except OSError as exc:
            for f in reversed(made):
                with contextlib.suppress(OSError):
                    f.rmdir()
            raise InputError(f"cannot write the run store {out}: {exc.strerror or exc}") from None
    return made


def _run_tiling(source: Path, out: Path, created: list[Path], *, auto: bool, auto_default: bool, mpp, mpp_target,
                method_name,
                defaults, tile_size: int, overlap: int, tissue_mask: bool, overwrite: bool, progress: bool,
                workers, scale_method, t0: float) -> TileReport:
    from nucli import __version__
    from nucli.slide import open_slide
    from nucli.tiling import tissue as tissue_mod

    with open_slide(source, mpp=None if auto else mpp) as slide, contextlib.ExitStack() as lock_stack:
        # the tissue overview, read once (the --mpp auto probe and the tile selection both use it)
        overview = functools.cache(lambda: tissue_mod.tissue_mask(slide))
        scale = None
        if (auto or auto_default) and slide.mpp is None:
            scale = _probe_scale(slide, scale_method, method_name, tile_size, overview if tissue_mask else None,
                                 only_default=not auto)
            auto = auto or scale is not None
        if scale is not None:
            log.info("%s has no pixel size; median nucleus %s px in %d probe nuclei -> zoom %.2fx",
                     source, "?" if scale.median_diameter_px is None else f"{scale.median_diameter_px:.1f}",
                     scale.n_nuclei, scale.zoom)
            target = None
        elif slide.mpp is None:
            if mpp_target is not None:
                raise InputError(f"{source} has no pixel size in its metadata; pass --mpp")
            if auto:
                log.info("%s has no pixel size and %s has no auto-zoom rule; working at native resolution",
                         source, method_name)
            else:
                log.warning("%s has no pixel size in its metadata; tiling at native resolution "
                            "(pass --mpp to set it)", source)
            target = None
        else:
            target = float(mpp_target) if mpp_target is not None else defaults.get("mpp")
        working_mpp = slide.resolve_working_mpp(target)
        ds = slide.downsample_for(working_mpp) if scale is None else 1.0 / scale.zoom
        if ds < 1.0 and scale is None:
            log.warning("%s (%.4g µm/px) is coarser than the working pixel size %.4g µm/px; "
                        "tiles are upsampled %.2fx", source, slide.mpp, working_mpp, 1.0 / ds)
        wsize = slide.working_size(working_mpp) if scale is None else tuple(
            max(1, int(math.floor(v / ds + 1e-6))) for v in slide.dimensions)
        grid = TileGrid(wsize[0], wsize[1], tile_size, overlap)
        settings = {
            "fingerprint": slide.fingerprint,
            "source_mpp": slide.mpp,
            "working_mpp": working_mpp,
            "downsample": ds,
            "working_size": [int(wsize[0]), int(wsize[1])],
            "tile_size": tile_size,
            "overlap": overlap,
            "tissue_mask": bool(tissue_mask),
        }

        # a second writer (another `nucli tile`, a segment run, --shard processes) is refused. The folder
        # is made first (mkdir is atomic: two runs into a new folder meet at the lock); folders made here
        # are removed again, if still empty, when the run fails
        from nucli.parallel.locks import StoreLock

        check_writable(out)
        created.extend(_make_parents(out))
        lock_stack.enter_context(StoreLock(out))
        existing = _inspect_output(out, settings, overwrite, slide.has_fingerprint)
        if existing is not None and _legacy_store_of_another_slide(existing, slide, ds, tile_size):
            if not overwrite:
                raise StoreError(f"{out} holds tiles of another slide or other settings (slide differ); "
                                 "pass --overwrite to replace it or choose another -o")
            existing = None
        if existing is not None:
            store = existing
            status = "resumed"
            lost = store.lost_tiles("tiles", STAGE)
            if len(lost):
                log.warning("%s: %d finished tiles are missing from the store (deleted files); writing them again",
                            out, len(lost))
                store.unmark_done(STAGE, lost)
        else:
            check_writable(out)
            fraction = None
            mask_ds = None
            if tissue_mask:
                mask, mask_ds = overview()
                fraction = float(mask.mean())
                tiles = tissue_mod.tiles_with_tissue(grid, mask, mask_ds, ds)
                if not tiles:
                    raise tissue_mod.NoTissueError(
                        f"no tissue found in {source}; pass --no-tissue-mask to tile the whole image"
                    )
            else:
                tiles = grid.all_tiles()
            meta = {
                "format_version": FORMAT_VERSION,
                "nucli_version": __version__,
                "source": {
                    "path": str(source.resolve()),
                    "name": source.name,
                    "fingerprint": slide.fingerprint,
                    "vendor": slide.vendor,
                    "backend": slide.backend,
                },
                "level0_size": [int(v) for v in slide.dimensions],
                "source_mpp": slide.mpp,
                "source_mpp_from": ("metadata" if slide.mpp else "auto") if auto else (
                    "--mpp" if mpp is not None else ("metadata" if slide.mpp else None)),
                "auto_scale": scale.to_dict() if scale is not None else None,
                "mpp_target": target,
                "working_mpp": working_mpp,
                "downsample": ds,
                "working_size": [int(wsize[0]), int(wsize[1])],
                "tile_size": tile_size,
                "overlap": overlap,
                "grid": {"xs": [int(v) for v in grid.xs], "ys": [int(v) for v in grid.ys],
                         "rows": grid.shape[0], "cols": grid.shape[1]},
                "tissue_mask": bool(tissue_mask),
                "tissue_fraction": fraction,
                "mask_downsample": mask_ds,
                "background": [int(v) for v in slide.background],
                "method": method_name,
                "stages": {},
            }
            store = _create_store(out, meta, grid, tiles, ds, overwrite)
            status = "created"

        done = store.done(STAGE)
        todo = [int(i) for i in np.flatnonzero(~done)]
        already = int(done.sum())
        if not todo:
            status = "complete"
            log.info("%s is complete (%d tiles); nothing to do", out, store.n_tiles)
        else:
            log.info("tiling %s: %d of %d tiles to write (%d px, overlap %d, downsample %.4g)",
                     source, len(todo), store.n_tiles, tile_size, overlap, ds)
            _write_tiles(slide, store, todo, ds, tile_size, progress=progress, workers=workers)

    m = store.meta
    return TileReport(
        store=store, path=out, n_tiles=store.n_tiles, grid_tiles=len(grid), written=len(todo),
        already_done=already, status=status, tissue_fraction=m.get("tissue_fraction"),
        source_mpp=m.get("source_mpp"), working_mpp=m.get("working_mpp"), downsample=float(m["downsample"]),
        seconds=time.perf_counter() - t0, auto_scale=m.get("auto_scale"),
    )


PROBE_TILES = 4


def _probe_scale(slide: Any, scale_method: Any, method_name: str | None, tile_size: int,
                 overview: Any = None, only_default: bool = False):
    """Segment up to :data:`PROBE_TILES` tissue tiles at native resolution -> :class:`ScaleEstimate`.

    ``overview()`` gives the tissue mask (None: every tile may be probed). None (nothing
    segmented) for a method without an auto-zoom rule; with ``only_default`` (no ``--mpp`` given), also
    None for weights that do not search the zoom by default (:func:`nucli.autoscale.auto_by_default`).
    """
    from nucli.autoscale import auto_by_default, choose_zoom, ratio_for, resize_rgb

    if scale_method is None:
        from nucli.models.registry import build_method, get_spec

        if ratio_for(get_spec(method_name).config) is None and not only_default:
            return None
        scale_method = build_method(method_name)
    if ratio_for(scale_method.config) is None:
        return None
    if only_default and not auto_by_default(scale_method.config):
        return None
    w0, h0 = (int(v) for v in slide.dimensions)
    grid = TileGrid(w0, h0, tile_size, 0)
    tiles = grid.all_tiles()
    if overview is not None:
        from nucli.tiling import tissue as tissue_mod

        mask, mask_ds = overview()
        tiles = tissue_mod.tiles_with_tissue(grid, mask, mask_ds, 1.0) or tiles
    probes = []
    for k in spread(len(tiles), PROBE_TILES):
        r, c = tiles[k]
        x, y = grid.origin(r, c)
        w, h = grid.extent(r, c)
        probes.append(slide.read_scaled(x, y, w, h, 1.0))

    def at(z: float) -> list[np.ndarray]:
        return [np.asarray(scale_method.segment((p if z == 1.0 else resize_rgb(p, z))[None])[0].labels)
                for p in probes]

    return choose_zoom(scale_method.config, at)[0]


# ---------------------------------------------------------------------- settings
def _method_defaults(method: str | None, need: bool) -> tuple[str | None, dict[str, Any]]:
    """(method name, {mpp, tile_size, overlap}) from the registry when needed or named."""
    if method is None and not need:
        return None, {}
    from nucli.models.registry import get_spec

    spec = get_spec(method)
    cfg = spec.config
    return spec.name, {"mpp": cfg.mpp, "tile_size": cfg.tile_size, "overlap": cfg.overlap}


def _differences(meta: dict[str, Any], settings: dict[str, Any], same_slide=None) -> list[str]:
    """The key settings that differ; ``same_slide(fingerprint)`` tells whether a store's recorded
    fingerprint is the slide's (older stores recorded another kind of fingerprint)."""
    have = dict(meta)
    have["fingerprint"] = (meta.get("source") or {}).get("fingerprint")
    diffs = []
    if same_slide is not None and have["fingerprint"] != settings.get("fingerprint"):
        if isinstance(have["fingerprint"], str) and same_slide(have["fingerprint"]):
            have["fingerprint"] = settings.get("fingerprint")
    for key in _KEY_SETTINGS:
        a, b = have.get(key), settings.get(key)
        if isinstance(a, float) or isinstance(b, float):
            same = a is not None and b is not None and abs(float(a) - float(b)) <= 1e-9 * max(abs(float(b)), 1.0)
            same = same or (a is None and b is None)
        else:
            same = (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)
        if not same:
            diffs.append("slide" if key == "fingerprint" else key)
    return diffs


def _legacy_store_of_another_slide(store: RunStore, slide: Any, ds: float, tile: int, samples: int = 3) -> bool:
    """For a store made before sampled fingerprints (size + first and last 64 KiB only): do a few of its
    finished tiles differ from the slide read again? Then it was made from another slide of the same size."""
    fp = (store.meta.get("source") or {}).get("fingerprint")
    if not isinstance(fp, str) or "-s-" in fp:
        return False
    done = np.flatnonzero(store.done(STAGE))
    origins = store.origins()
    for k in spread(len(done), samples):
        i = int(done[k])
        x, y = int(origins[i, 0]), int(origins[i, 1])
        if not np.array_equal(slide.read_scaled(x, y, tile, tile, ds), store.read_tile(i)):
            return True
    return False


# ---------------------------------------------------------------------- output handling
def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "zarr.json").exists() or (path / ".zgroup").exists())


def _inspect_output(out: Path, settings: dict[str, Any], overwrite: bool, same_slide=None) -> RunStore | None:
    """A compatible store to resume, or None to create one (refusing what must not be replaced:
    with ``overwrite`` only what nucli wrote, :func:`nucli.outputs.check_replaceable`)."""
    from nucli.outputs import check_replaceable, nucli_wrote

    if not out.exists() and not out.is_symlink():
        return None
    if _is_zarr_dir(out) and nucli_wrote(out):
        try:
            store = RunStore.open(out, mode="r+")
        except StoreError:
            if overwrite:
                return None
            raise StoreError(f"{out} exists but is not a readable nucli run store; "
                             "pass --overwrite to replace it or choose another -o") from None
        diffs = _differences(store.meta, settings, same_slide)
        if not diffs:
            if not store.has("tiles") or not store.has("origin"):
                raise StoreError(f"{out}: run store is missing its tiles; pass --overwrite to redo it")
            return None if overwrite else store
        if overwrite:
            return None
        raise StoreError(
            f"{out} holds tiles of another slide or other settings ({', '.join(diffs)} differ); "
            "pass --overwrite to replace it or choose another -o"
        )
    if not nucli_wrote(out):  # --overwrite would not replace it either: say so, not "pass --overwrite"
        check_replaceable(out, True)
    if not overwrite:
        raise OutputExistsError(f"{out} already exists and is not a nucli run store; "
                                "choose another -o or pass --overwrite")
    return None


def _temp_path(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.{tag}-{os.getpid()}"


def _remove_stale(out: Path) -> None:
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create_store(out: Path, meta: dict[str, Any], grid: TileGrid, tiles: list[tuple[int, int]],
                  ds: float, overwrite: bool) -> RunStore:
    """Plan the store in a temp dir beside ``out`` and move it into place."""
    tmp = _temp_path(out, "partial")
    created = None  # folders made for the store are removed by run_tiling when empty
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        if tmp.exists():
            shutil.rmtree(tmp)
        store = RunStore.create(tmp, meta, n_tiles=len(tiles), tile_size=grid.tile_size, channels=3)
        index = np.asarray(tiles, dtype=np.int32).reshape(-1, 2)
        origin = np.asarray([grid.origin(r, c) for r, c in tiles], dtype=np.int64).reshape(-1, 2)
        store.array("index")[:] = index
        store.array("origin")[:] = origin
        store.array("origin_level0")[:] = origin.astype(np.float64) * ds
        store.init_done(STAGE)
        if out.exists() or out.is_symlink():
            if not overwrite:  # appeared meanwhile
                raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
            trash = _temp_path(out, "old")
            os.replace(out, trash)
            os.replace(tmp, out)
            if trash.is_dir():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        _undo(tmp, created)
        raise InputError(f"cannot write the run store {out}: {exc.strerror or exc}") from None
    except BaseException:
        _undo(tmp, created)
        raise
    return RunStore.open(out, mode="r+")


def _undo(tmp: Path, created: Path | None) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


# ---------------------------------------------------------------------- tile loop
def _write_one(slide, store: RunStore, i: int, x: int, y: int, ds: float, tile: int) -> int:
    try:
        img = slide.read_scaled(x, y, tile, tile, ds)
    except InputError as exc:  # a damaged part of the slide: stop, naming the tile; finished tiles are kept
        row, col = (int(v) for v in store.indices()[i])
        raise InputError(f"tile {i} (row {row}, col {col}, working px x={x} y={y}) cannot be read: {exc}") from None
    store.write("tiles", i, img)
    store.mark_done(STAGE, i)  # after the pixels: a "done" tile is always complete
    return i


def _write_tiles(slide, store: RunStore, todo: list[int], ds: float, tile: int, *, progress: bool,
                 workers: int | None) -> None:
    origins = store.origins()
    n_workers = max(1, int(workers if workers is not None else min(4, os.cpu_count() or 1)))
    with _progress(progress, len(todo), f"tiling {store.path.name}") as advance:
        if n_workers == 1:
            for i in todo:
                _write_one(slide, store, i, int(origins[i, 0]), int(origins[i, 1]), ds, tile)
                advance()
            return
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="nucli-tile") as pool:
            def submit(i: int) -> Future:
                f = pool.submit(_write_one, slide, store, i, int(origins[i, 0]), int(origins[i, 1]), ds, tile)
                f.tile = i  # type: ignore[attr-defined]
                return f

            pending: set[Future] = set()
            it = iter(todo)
            try:
                for i in _chain_limit(it, n_workers * 2):
                    pending.add(submit(i))
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    failed = [f for f in finished if f.exception() is not None]
                    if failed:
                        wait(pending)
                        failed += [f for f in pending if f.exception() is not None]
                        finished = finished | pending
                        pending = set()
                        other = [f for f in failed if not isinstance(f.exception(), InputError)]
                        if other:  # an interrupt or a bug: not a damaged slide
                            raise min(other, key=lambda f: f.tile).exception()
                        # a failed read can leave the slide's handle unusable (OpenSlide), so reads running
                        # beside it fail too: retry the failed tiles in order, each on a fresh handle, and
                        # stop at the first that fails on its own (the damaged one)
                        _retry_in_order(slide, store, sorted(f.tile for f in failed), origins, ds, tile)
                    for f in finished:
                        advance()
                        nxt = next(it, None)
                        if nxt is not None:
                            pending.add(submit(nxt))
            except BaseException:
                for f in pending:
                    f.cancel()
                raise


def _retry_in_order(slide, store: RunStore, tiles: list[int], origins: np.ndarray, ds: float, tile: int) -> None:
    """Read ``tiles`` again in index order, each with a freshly opened slide; raise at the first failure."""
    from nucli.slide import open_slide

    for i in tiles:
        fresh = open_slide(slide.path) if getattr(slide, "path", None) is not None else slide
        try:
            _write_one(fresh, store, i, int(origins[i, 0]), int(origins[i, 1]), ds, tile)
        finally:
            if fresh is not slide and hasattr(fresh, "close"):
                fresh.close()


def _chain_limit(it, n: int) -> Iterable[int]:
    for _ in range(n):
        v = next(it, None)
        if v is None:
            return
        yield v


class _progress:
    """Rich progress (count, rate, ETA) on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled = enabled
        self.total = total
        self.label = label
        self._p = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._p = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False,
        )
        self._p.start()
        task = self._p.add_task(self.label, total=self.total, rate="")
        start = time.perf_counter()
        count = [0]

        def advance() -> None:
            count[0] += 1
            dt = time.perf_counter() - start
            rate = f"{count[0] / dt:.1f} tiles/s" if dt > 0 else ""
            self._p.update(task, advance=1, rate=rate)

        return advance

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.stop()


def read_tile_back(store: RunStore, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[float, float]]:
    """(pixels, working origin, level-0 origin) of stored tile ``i`` (a convenience for tools/tests)."""
    o = store.array("origin")[i]
    o0 = store.array("origin_level0")[i]
    return store.read_tile(i), (int(o[0]), int(o[1])), (float(o0[0]), float(o0[1]))


__all__ = ["tile_slide", "run_tiling", "TileReport", "read_tile_back", "STAGE", "ATTR_KEY"]
