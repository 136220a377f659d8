"""Run a segmentation method over the tiles of a run store (serial runner).

For every tile not yet done: read a batch of tiles, cut each to the part that
lies inside the image (padding is never shown to a method), ``method.segment``,
write the per-tile labels (array ``labels``, int32 (N, T, T)) and per-nucleus
scores if the method gives any (array ``scores``, float32 (N, K): score of
label ``k`` at ``[i, k]``, NaN where none), then mark ``done/segment`` for the
tile. A tile is done only after its data is written, so a run killed at any
moment resumes where it stopped. The method's settings are recorded with
``store.set_stage_meta('segment', method.describe())``: a rerun with another
method or other settings is refused unless ``overwrite``.

The loop is :func:`segment_store`: it plans batches of pending tiles and
hands them, with :class:`SegmentJob` (load -> ``method.infer`` ->
``method.postprocess`` + :func:`write_tile_result`), to a runner from
:mod:`nucli.parallel` (serial with overlapping threads by default; Dask local,
an existing scheduler or SLURM when asked). ``shard='i/n'`` processes only
every n-th tile so independent processes can fill one store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import numpy as np

from nucli.errors import ProcessingError
from nucli.models.base import Method, TileResult
from nucli.tiling.store import RunStore

log = logging.getLogger(__name__)

STAGE = "segment"
LABELS = "labels"
SCORES = "scores"


@dataclass
class SegmentStats:
    tiles_total: int
    tiles_done_before: int
    tiles_segmented: int
    seconds: float


def max_scores(tile_size: int) -> int:
    """Width K of the ``scores`` array: room for one score per possible nucleus."""
    return max(4096, tile_size * tile_size // 64)


def tile_extents(store: RunStore) -> np.ndarray:
    """(N, 2) of each stored tile's in-image (w, h) in working px."""
    grid = store.grid
    idx = store.indices()
    out = np.zeros((len(idx), 2), np.int64)
    for i, (r, c) in enumerate(idx):
        out[i] = grid.extent(int(r), int(c))
    return out


def pending_tiles(store: RunStore, stage: str = STAGE) -> np.ndarray:
    """Indices of tiles that have not finished ``stage``."""
    return np.flatnonzero(~store.done(stage))


def record_device(store: RunStore, stage: str, device: dict | None, fresh: bool = False) -> None:
    """Add ``device`` ({"device", "gpu"}) to the devices that ran ``stage`` (attribute ``devices``).

    Not a setting: a store segmented on one device resumes on another, and each is listed.
    ``fresh``: the stage starts over, so only this device is listed.
    """
    if not device:
        return
    devices = dict(store.meta.get("devices") or {})
    runs = [] if fresh else [d for d in (devices.get(stage) or []) if isinstance(d, dict)]
    if dict(device) not in runs:
        runs.append(dict(device))
    devices[stage] = runs
    store.update_meta(devices=devices)


def prepare(store: RunStore, method: Method, overwrite: bool = False, device: dict | None = None) -> None:
    """Record the method's settings (refusing a mix) and the device, and create the labels array."""
    from nucli.errors import StoreError

    if store.has("done/tile") and not store.is_complete("tile"):
        missing = int((~store.done("tile")).sum())
        raise StoreError(f"{store.path}: {missing} tiles were never written (tiling was interrupted); "
                         "rerun `nucli tile` with the same options to finish it")
    lost = store.lost_tiles("tiles", "tile")
    if len(lost):
        raise StoreError(f"{store.path}: the pixels of {len(lost)} tiles are missing (files deleted from the store); "
                         "rerun `nucli tile` (or `nucli segment` on the slide) with the same options to restore them")
    lost = store.lost_tiles(LABELS, STAGE)
    if len(lost):
        log.warning("%s: the labels of %d segmented tiles are missing (files deleted from the store); "
                    "segmenting them again", store.path, len(lost))
        store.unmark_done(STAGE, lost)
    store.set_stage_meta(STAGE, method.describe(), overwrite=overwrite)
    record_device(store, STAGE, device, fresh=not store.done(STAGE).any())
    if hasattr(store, "init_done"):
        store.init_done(STAGE)
    t = store.tile_size
    store.ensure_array(LABELS, (t, t), "int32", fill_value=0)


def write_tile_result(store: RunStore, i: int, result: TileResult, extent: tuple[int, int]) -> None:
    """Validate one tile's result, write labels (and scores), then mark the tile done."""
    t = store.tile_size
    w, h = int(extent[0]), int(extent[1])
    labels = np.asarray(result.labels)
    if labels.shape != (h, w):
        raise ProcessingError(
            f"method returned labels of shape {labels.shape} for a tile of {h}x{w} px; "
            "the method is broken (report it)"
        )
    if labels.size and labels.min() < 0:
        raise ProcessingError("method returned negative labels; the method is broken (report it)")
    from nucli.postprocess import relabel_sequential

    if labels.size and labels.max() > 0:
        seq = relabel_sequential(labels)
    else:
        seq = np.zeros((h, w), np.int32)
    full = np.zeros((t, t), np.int32)
    full[:h, :w] = seq
    store.write(LABELS, i, full)
    if result.scores:
        k = max_scores(t)
        n = int(seq.max())
        if n >= k:
            raise ProcessingError(f"tile {i}: {n} nuclei in one tile exceeds {k - 1}; use a smaller --tile-size")
        arr = _ensure_shared_array(store, SCORES, (k,), "float32", float("nan"))
        row = np.full(k, np.nan, np.float32)
        # map the method's label ids to the sequential ids written above
        orig = labels.ravel()
        new = seq.ravel()
        nz = orig > 0
        pairs = np.unique(np.stack([orig[nz], new[nz]]), axis=1) if nz.any() else np.zeros((2, 0), int)
        for old_id, new_id in pairs.T:
            score = result.scores.get(int(old_id))
            if score is not None:
                row[int(new_id)] = float(score)
        arr[i] = row
    elif store.has(SCORES):  # left by an earlier method (--overwrite): no stale scores
        store.write(SCORES, i, np.full(max_scores(t), np.nan, np.float32))
    store.mark_done(STAGE, i)


def _ensure_shared_array(store: RunStore, name: str, tile_shape: tuple[int, ...], dtype: str, fill_value):
    """``store.ensure_array`` that tolerates another worker creating the same array at the same moment."""
    try:
        return store.ensure_array(name, tile_shape, dtype, fill_value=fill_value)
    except Exception:
        if store.has(name):  # created meanwhile by a concurrent writer
            return store.ensure_array(name, tile_shape, dtype, fill_value=fill_value)
        raise


@contextmanager
def track(total: int, description: str, enabled: bool = True, unit: str = "tiles") -> Iterator[Callable[[int], None]]:
    """A rich progress bar (count, rate, ETA) on stderr; yields ``advance(n)``. No-op when disabled."""
    if not enabled or total <= 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class _Rate(ProgressColumn):
        def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:.1f} {unit}/s")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def has_model_step(method: Method) -> bool:
    """Whether ``method`` runs a model in ``infer`` (else all of its work is the CPU post-processing)."""
    return type(method).infer is not Method.infer or _segments_whole(method)


def _segments_whole(method: Method) -> bool:
    """A method that overrides ``segment`` itself cannot be split into infer/postprocess (unless it says
    that its ``segment`` is ``postprocess_tiles(infer(tiles), tiles)``: ``splits_segment``)."""
    return type(method).segment is not Method.segment and not getattr(method, "splits_segment", False)


class SegmentJob:
    """One batch of ``segment``: read tiles -> model -> post-process + write (see :class:`nucli.parallel.TileJob`).

    ``from_enhanced``: read the enhanced tiles ``nucli enhance`` stored instead of the
    slide's pixels and run only the method's second stage (``method.classify``), for a
    method with an enhancement stage whose complete output is in the store.
    """

    stage = STAGE

    def __init__(self, from_enhanced: bool = False, post_threads: int = 1):
        self.from_enhanced = bool(from_enhanced)
        # > 1: a batch's tiles are post-processed on this many CPU threads (a GPU's batches are large)
        self.post_threads = max(1, int(post_threads))

    def load(self, store: RunStore, batch) -> np.ndarray:
        w, h = batch.extent
        if self.from_enhanced:
            from nucli.models.gensegnet.enhance import ARRAY as ENHANCED

            return np.stack([store.read(ENHANCED, i)[:h, :w] for i in batch.members])
        return np.stack([store.read_tile(i)[:h, :w] for i in batch.members])

    def compute(self, method: Method, pixels: np.ndarray):
        """The model step (the calling thread); the post-processing waits for :meth:`finish`."""
        if self.from_enhanced:
            return "raw", method.classify(pixels), None
        if _segments_whole(method):
            return "results", method.segment(pixels), None
        return "raw", method.infer(pixels), pixels

    def finish(self, store: RunStore, method: Method, batch, computed) -> None:
        kind, value, pixels = computed
        results = self._postprocess(method, value, pixels) if kind == "raw" else value
        if len(results) != len(batch.members):
            raise ProcessingError(
                f"method '{method.name}' returned {len(results)} results for {len(batch.members)} tiles"
            )
        for i, result in zip(batch.members, results):
            write_tile_result(store, i, result, batch.extent)

    def run(self, store: RunStore, method: Method, batch) -> int:
        self.finish(store, method, batch, self.compute(method, self.load(store, batch)))
        return len(batch.members)

    def _postprocess(self, method: Method, raw, pixels=None) -> list:
        """``method.postprocess`` (``postprocess_tiles`` when the pixels are at hand) of a batch, split over
        ``post_threads`` threads when the model output is one array of per-tile rows (each tile's
        post-processing is independent: the same results, in order)."""
        def post(r, px):
            return method.postprocess(r) if px is None else method.postprocess_tiles(r, px)

        n = len(raw) if isinstance(raw, np.ndarray) and raw.ndim > 0 else 0
        if self.post_threads == 1 or n < 2:
            return post(raw, pixels)
        from concurrent.futures import ThreadPoolExecutor

        k = min(self.post_threads, n)
        bounds = np.linspace(0, n, k + 1).astype(int)
        spans = list(zip(bounds[:-1], bounds[1:]))
        with ThreadPoolExecutor(k, thread_name_prefix="nucli-post") as pool:
            parts = pool.map(post, [raw[a:b] for a, b in spans],
                             [None if pixels is None else pixels[a:b] for a, b in spans])
            return [r for part in parts for r in part]


def uses_stored_enhancement(store: RunStore, method: Method) -> bool:
    """True when ``method`` has a separate enhancement stage and ``store`` holds its complete output
    (never with flip test-time augmentation: the generator then runs on each flip of the tile)."""
    if not (hasattr(method, "classify") and hasattr(method, "enhance")):
        return False
    if method.config.params.get("tta"):
        return False
    from nucli.enhance_stage import has_enhanced

    return has_enhanced(store, method)


def segment_store(
    store: RunStore,
    method: Method,
    *,
    batch_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    runner=None,
    recipe=None,
    shard=None,
    lock: bool = True,
    device: dict | None = None,
    post_threads: int | None = None,
) -> SegmentStats:
    """Segment every tile of ``store`` that is not done yet.

    ``runner`` (:class:`nucli.parallel.Runner`, default serial) decides where the
    batches run; Dask runners build the method on each worker from ``recipe``
    (:class:`nucli.parallel.MethodRecipe`) or receive ``method`` once per worker.
    ``shard`` ('i/n' or :class:`nucli.parallel.Shard`) limits the run to every
    n-th tile. The store is locked against a second writer without ``--shard``
    (``lock=False`` skips that). ``on_batch(n)`` is called after each finished batch.
    ``device`` ({"device", "gpu"}, :meth:`nucli.parallel.device.Device.record`) is added
    to the store's record of the devices that ran the stage. ``post_threads`` > 1
    post-processes each batch's tiles on that many CPU threads (for a GPU's large batches); None:
    one per usable CPU for a method without a model step (``watershed``) on the serial runner, else 1.
    """
    from nucli.parallel import Runner, Shard, StoreLock, plan_batches, setup_lock

    start = time.perf_counter()
    shard = Shard.parse(shard)
    runner = runner or Runner.serial()
    guard = StoreLock(store.path, shard) if lock else nullcontext()
    with guard:
        with setup_lock(store.path):
            if hasattr(store, "reload"):
                store.reload()  # another process may have set up the stage meanwhile
            prepare(store, method, overwrite=overwrite, device=device)
        todo = pending_tiles(store)
        total = store.n_tiles
        done_before = total - len(todo)
        if shard is not None:
            todo = shard.select(todo)
        bs = int(batch_size or method.config.batch_size or 1)
        batches = plan_batches(todo, tile_extents(store), bs)
        log.info("segment: %d of %d tiles to do (batch %d%s, %s)", len(todo), total, bs,
                 f", shard {shard}" if shard else "", runner.describe())
        if post_threads is None:  # no network to keep the cores busy: the tiles of a batch in parallel
            from nucli.stitching import usable_cpus

            post_threads = usable_cpus(8) if runner.mode == "serial" and not has_model_step(method) else 1
        job = SegmentJob(from_enhanced=uses_stored_enhancement(store, method), post_threads=post_threads)
        if job.from_enhanced and len(todo):
            log.info("segment: using the enhanced tiles stored by `nucli enhance` (generator not rerun)")
        with track(total=len(todo), description=f"Segmenting ({method.name})", enabled=progress) as advance:
            def step(n: int) -> None:
                advance(n)
                if on_batch is not None:
                    on_batch(n)

            runner.run(store, job, method, batches, recipe=recipe, advance=step)
    return SegmentStats(total, done_before, len(todo), time.perf_counter() - start)


def store_from_array(
    path,
    image: np.ndarray,
    *,
    tile_size: int = 512,
    overlap: int = 64,
    downsample: float = 1.0,
    source_mpp: float | None = None,
    level0_size: tuple[int, int] | None = None,
    fingerprint: str = "array",
    overwrite: bool = False,
) -> RunStore:
    """A run store holding every tile of an in-memory working-resolution RGB image.

    For images that already sit in memory (small images, tests); slides go
    through ``nucli.tiling.tiler.tile_slide``. Tiles are padded with white.
    """
    from nucli.postprocess import as_rgb
    from nucli.tiling.grid import TileGrid

    image = as_rgb(np.asarray(image))
    if image.dtype != np.uint8:
        raise ProcessingError(f"expected a uint8 image, got {image.dtype}")
    h, w = image.shape[:2]
    grid = TileGrid(w, h, tile_size, overlap)
    tiles = grid.all_tiles()
    l0 = level0_size or (round(w * downsample), round(h * downsample))
    meta = {
        "source": {"path": None, "fingerprint": fingerprint, "vendor": "array", "backend": "numpy"},
        "level0_size": [int(l0[0]), int(l0[1])],
        "source_mpp": source_mpp,
        "working_mpp": source_mpp * downsample if source_mpp else None,
        "downsample": float(downsample),
        "working_size": [w, h],
        "tile_size": tile_size,
        "overlap": overlap,
        "grid": {"xs": grid.xs, "ys": grid.ys},
    }
    store = RunStore.create(path, meta, n_tiles=len(tiles), tile_size=tile_size, overwrite=overwrite)
    index = np.zeros((len(tiles), 2), np.int32)
    origin = np.zeros((len(tiles), 2), np.int64)
    for i, (r, c) in enumerate(tiles):
        x, y = grid.origin(r, c)
        ew, eh = grid.extent(r, c)
        tile = np.full((tile_size, tile_size, 3), 255, np.uint8)
        tile[:eh, :ew] = image[y : y + eh, x : x + ew]
        store.write("tiles", i, tile)
        index[i] = (r, c)
        origin[i] = (x, y)
    store.array("index")[:] = index
    store.array("origin")[:] = origin
    store.array("origin_level0")[:] = origin.astype(np.float64) * downsample
    store.init_done("tile")
    store.array("done/tile")[:] = 1
    return store


# --------------------------------------------------------------------------- end to end


def is_run_store(path) -> bool:
    """A directory holding a Zarr group whose attributes carry nucli metadata."""
    import json
    from pathlib import Path

    meta = Path(path) / "zarr.json"
    if not (Path(path).is_dir() and meta.is_file()):
        return False
    try:
        return "nucli" in (json.loads(meta.read_text()).get("attributes") or {})
    except (OSError, ValueError):
        return False


def _tile_source(source, store_path, *, method: Method, mpp, mpp_target, tile_size, overlap, tissue_mask,
                 overwrite: bool, progress: bool) -> RunStore:
    """Tile a slide into ``store_path`` (resuming a compatible store; replacing another only with overwrite)."""
    from nucli.errors import NotAvailableError, StoreError

    try:
        from nucli.tiling.tiler import tile_slide
    except ImportError:
        raise NotAvailableError(
            "tiling a slide is not available in this build; give a run store made by `nucli tile`"
        ) from None
    cfg = method.config
    # mpp_target stays None unless the user gave it: the tiler then takes the method's
    # default and, for a slide without a pixel size, works at native resolution.
    kwargs = dict(mpp=mpp, mpp_target=mpp_target, method=method.name,
                  tile_size=tile_size or cfg.tile_size, overlap=cfg.overlap if overlap is None else overlap,
                  tissue_mask=tissue_mask, progress=progress, scale_method=method)
    try:
        return tile_slide(source, store_path, overwrite=False, **kwargs)
    except StoreError:
        if not overwrite:
            raise
        log.info("replacing run store %s (other slide or settings)", store_path)
        return tile_slide(source, store_path, overwrite=True, **kwargs)


def segment_to_outputs(
    source,
    output,
    *,
    method: str | None = None,
    store=None,
    formats: list[str] | None = None,
    overlay=None,
    weights=None,
    batch_size: int | None = None,
    mpp: float | None = None,
    mpp_target: float | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    tissue_mask: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    device="cpu",
    precision: str | None = None,
    runner=None,
    shard=None,
    objects=None,
    tta: bool | None = None,
) -> dict:
    """``nucli segment``: tile (if given a slide), segment, stitch, export. Returns the summary.

    ``device`` (``auto|cpu|cuda|cuda:N|mps`` or a resolved
    :class:`nucli.parallel.device.Device`) is where the model runs, in mixed
    ``precision`` on a GPU (default: the method's); without ``batch_size`` a GPU
    takes as many tiles per batch as its free memory holds.
    ``runner`` (:func:`nucli.parallel.make_runner`) says where tiles are segmented.
    With ``shard='i/n'`` the source must be a run store and ``output`` None: only
    that shard's tiles are segmented (no stitch; run ``nucli stitch`` once all
    shards have finished).

    ``tta``: flip test-time augmentation (gensegnet, harunet: 4x the network time; None: as the weights say).

    ``objects`` (:func:`nucli.export.cells.object_options`): export cells and/or DAB positivity classes;
    what the slide cannot give (no pixel size for cells, no DAB stain) is refused before segmenting.
    """
    from pathlib import Path

    from nucli.errors import UsageError
    from nucli.export import check_outputs, default_store_path, resolve_outputs
    from nucli.parallel import Shard

    start = time.perf_counter()
    shard = Shard.parse(shard)
    source = Path(source)
    from nucli.parallel.device import batch_for, device_and_runner, method_for, post_threads_for

    dev, runner = device_and_runner(device, runner)
    if shard is not None:
        return _segment_shard(source, shard, method=method, weights=weights, batch_size=batch_size, output=output,
                              formats=formats, overlay=overlay, overwrite=overwrite, progress=progress,
                              device=dev, precision=precision, runner=runner, tta=tta)
    if output is None:
        raise UsageError("-o/--output is required: the GeoJSON file to write (or use --shard i/n on a run store)")
    output = Path(output)
    outputs = resolve_outputs(output, formats)
    inputs = [("the input", source), ("the weights", Path(weights) if weights is not None else None)]
    check_outputs([*outputs.values(), *([Path(overlay)] if overlay else [])], overwrite, inputs=inputs)
    m, recipe = method_for(method, weights, dev, precision, runner, tta)

    if is_run_store(source):
        ignored = [n for n, v in (("--mpp", mpp), ("--mpp-target", mpp_target), ("--tile-size", tile_size),
                                  ("--overlap", overlap), ("--store", store)) if v is not None]
        if ignored:
            log.warning("%s ignored: %s is already tiled", ", ".join(ignored), source)
        run_store = RunStore.open(source, mode="r+")
    else:
        from nucli.outputs import refuse_inputs

        store_path = Path(store) if store is not None else default_store_path(output)
        refuse_inputs([("--store" if store is not None else "the run store", store_path)], inputs)
        used = {Path(p).resolve() for p in outputs.values()}
        if store_path.resolve() in used or (overlay and store_path.resolve() == Path(overlay).resolve()):
            raise UsageError(f"the run store {store_path} would overwrite an output; pass another --store")
        run_store = _tile_source(source, store_path, method=m, mpp=mpp, mpp_target=mpp_target,
                                 tile_size=tile_size, overlap=overlap, tissue_mask=tissue_mask,
                                 overwrite=overwrite, progress=progress)
    if run_store.n_tiles and run_store.overlap < m.config.max_nucleus_diameter_px:
        log.warning("tile overlap %d px is below the method's largest nucleus (%d px); large nuclei will stop "
                    "the stitch (re-tile with a larger --overlap)", run_store.overlap,
                    m.config.max_nucleus_diameter_px)
    bs = batch_for(dev, run_store, m, batch_size)
    from nucli.export.cells import check_store

    check_store(run_store, objects)  # what the slide cannot give is refused before segmenting
    seg = segment_store(run_store, m, batch_size=bs, overwrite=overwrite, progress=progress,
                        runner=runner, recipe=recipe, device=dev.record(), post_threads=post_threads_for(dev))
    summary = stitch_to_outputs(run_store, outputs, overlay=overlay, progress=progress, objects=objects)
    summary["method"] = m.name
    summary["tiles_segmented_now"] = seg.tiles_segmented
    summary["runner"] = runner.describe()
    summary.update(dev.record())
    summary["batch_size"] = bs
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _segment_shard(source, shard, *, method, weights, batch_size, output, formats, overlay, overwrite, progress,
                   device, precision, runner, tta=None) -> dict:
    """``nucli segment RUN.zarr --shard i/n``: segment this shard's tiles only; the summary."""
    from nucli.errors import UsageError
    from nucli.parallel.device import batch_for, method_for, post_threads_for

    start = time.perf_counter()
    if output is not None or formats or overlay is not None:
        raise UsageError(f"--shard segments only its share of the tiles; leave out -o/--format/--overlay and run "
                         f"`nucli stitch {source} -o OUT.geojson` once every shard has finished")
    if not is_run_store(source):
        raise UsageError(f"--shard needs a run store: tile once with `nucli tile {source} -o RUN.zarr`, "
                         "then run every shard on RUN.zarr")
    m, recipe = method_for(method, weights, device, precision, runner, tta)
    store = RunStore.open(source, mode="r+")
    bs = batch_for(device, store, m, batch_size)
    seg = segment_store(store, m, batch_size=bs, overwrite=overwrite, progress=progress, runner=runner,
                        recipe=recipe, shard=shard, device=device.record(), post_threads=post_threads_for(device))
    done = int(store.done(STAGE).sum())
    return {
        "store": str(source),
        "method": m.name,
        "shard": str(shard),
        "tiles": seg.tiles_total,
        "tiles_in_shard": int(len(shard.select(np.arange(seg.tiles_total)))),
        "tiles_segmented_now": seg.tiles_segmented,
        "tiles_done_in_store": done,
        "complete": done == seg.tiles_total,
        "runner": runner.describe(),
        **device.record(),
        "batch_size": bs,
        "seconds": round(time.perf_counter() - start, 2),
    }


def stitch_to_outputs(store: RunStore, outputs: dict, *, overlay=None, progress: bool = True, objects=None) -> dict:
    """Stitch a segmented store into the given outputs; the summary (nuclei, tissue, density, paths).

    ``objects`` (:func:`nucli.export.cells.object_options`): cells and/or DAB positivity classes.
    """
    from pathlib import Path

    from nucli.export import make_sinks
    from nucli.export.cells import ObjectStage, check_store
    from nucli.stitching import stitch_store

    start = time.perf_counter()
    check_store(store, objects)
    sinks = make_sinks(outputs, Path(overlay) if overlay else None, objects)
    stats = stitch_store(store, sinks, progress=progress)
    object_summary = next((s.summary() for s in sinks if isinstance(s, ObjectStage)), {})
    density = stats.density_per_mm2
    paths = [str(p) for p in outputs.values()] + ([str(overlay)] if overlay else [])
    meta = store.meta
    return {
        "nuclei": stats.nuclei,
        "tissue_area_mm2": round(stats.tissue_area_um2 / 1e6, 4) if stats.tissue_area_um2 else None,
        "density_per_mm2": round(density, 1) if density is not None else None,
        "residual_overlaps_removed": stats.residual_overlaps_removed,
        "tiles": stats.tiles,
        "modality": "brightfield" if stats.brightfield else "fluorescence",
        "working_mpp": meta.get("working_mpp"),
        **({"auto_zoom": meta["auto_scale"]["zoom"]} if meta.get("auto_scale") else {}),
        "method": (store.stage_meta(STAGE) or {}).get("method"),
        "store": str(store.path),
        **object_summary,
        "outputs": paths,
        "seconds": round(time.perf_counter() - start, 2),
    }
