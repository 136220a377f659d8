"""The enhancement stage over a run store: GeNSeg-Net's generator on every tile, results stored.

``enhance_store`` runs a method's ``enhance`` over every tile of a run store
that is not yet done, through a runner from :mod:`nucli.parallel` (serial, Dask,
a scheduler or SLURM; on the device the method was built on), and writes array
``enhanced`` (uint8 (N, T, T), 0 outside the image) with ``done/enhance``. The
generator's settings (:func:`nucli.models.gensegnet.enhance.stage_settings`) are
the stage's settings, so a rerun with other weights is refused without
--overwrite; the device is not a setting (recorded, a store resumes on another).
``segment`` then runs only the U-Net and the watershed when the stage is complete
(:func:`has_enhanced`). The method itself stays a pure function of tiles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from nucli.errors import InputError
from nucli.models.gensegnet.enhance import ARRAY, STAGE, stage_settings

__all__ = ["ARRAY", "STAGE", "EnhanceJob", "enhance_store", "has_enhanced", "segment_from_store", "write_pngs"]


class EnhanceJob:
    """One batch of ``enhance``: read tiles -> generator -> write ``enhanced`` + mark done.

    The same job shape as :class:`nucli.pipeline.SegmentJob`, so any runner (serial,
    Dask local, a scheduler, SLURM) can run it.
    """

    stage = STAGE

    def load(self, store, batch) -> np.ndarray:
        w, h = batch.extent
        return np.stack([store.read_tile(i)[:h, :w] for i in batch.members])

    def compute(self, method, pixels: np.ndarray) -> np.ndarray:
        from nucli.models.gensegnet.method import enhanced_to_uint8

        return enhanced_to_uint8(method.enhance(pixels))

    def finish(self, store, method, batch, computed: np.ndarray) -> None:
        t = store.tile_size
        for i, e in zip(batch.members, computed):
            full = np.zeros((t, t), np.uint8)
            full[: e.shape[0], : e.shape[1]] = e
            store.write(ARRAY, i, full)
            store.mark_done(STAGE, i)  # after the pixels: a "done" tile is always complete

    def run(self, store, method, batch) -> int:
        self.finish(store, method, batch, self.compute(method, self.load(store, batch)))
        return len(batch.members)


def enhance_store(store, method, *, batch_size: int | None = None, overwrite: bool = False,
                  advance: Callable[[int], None] | None = None, runner=None, recipe=None, shard=None,
                  lock: bool = True, device: dict | None = None) -> dict:
    """Enhance every pending tile of ``store``; returns counts.

    ``runner`` (:class:`nucli.parallel.Runner`, default serial) decides where the batches run
    (Dask workers build the method from ``recipe``); ``shard`` ('i/n') limits the run to every
    n-th tile, for job arrays. The store is locked against a second writer without ``--shard``.
    ``device`` ({"device", "gpu"}) is added to the store's record of the devices that ran the stage.
    """
    from contextlib import nullcontext

    from nucli.parallel import Runner, Shard, StoreLock, plan_batches, setup_lock
    from nucli.pipeline import record_device, tile_extents

    shard = Shard.parse(shard)
    runner = runner or Runner.serial()
    with StoreLock(store.path, shard) if lock else nullcontext():
        with setup_lock(store.path):
            if hasattr(store, "reload"):
                store.reload()  # another shard may have set the stage up meanwhile
            store.set_stage_meta(STAGE, stage_settings(method), overwrite=overwrite)
            record_device(store, STAGE, device, fresh=not store.done(STAGE).any())
            store.init_done(STAGE)
            t = store.tile_size
            store.ensure_array(ARRAY, (t, t), "uint8", fill_value=0)
        todo = np.flatnonzero(~store.done(STAGE))
        if shard is not None:
            todo = shard.select(todo)
        bs = int(batch_size or method.config.batch_size or 1)
        batches = plan_batches(todo, tile_extents(store), bs)
        runner.run(store, EnhanceJob(), method, batches, recipe=recipe, advance=advance or (lambda n: None))
    return {"tiles_total": store.n_tiles, "tiles_enhanced": int(len(todo))}


def has_enhanced(store, method) -> bool:
    """True when ``store`` holds a complete enhancement made by this method's generator."""
    meta = store.stage_meta(STAGE)
    if not meta or meta.get("method") != method.name or not store.has(ARRAY):
        return False
    if not bool(store.done(STAGE).all()):
        return False
    return meta == stage_settings(method)


def segment_from_store(store, method, members: list[int], extent: tuple[int, int]):
    """TileResults of tiles ``members`` (all of in-image size ``extent`` = (w, h)) from their stored
    enhanced images: only the U-Net and the watershed run. Drop-in for ``method.segment(pixels)``."""
    w, h = int(extent[0]), int(extent[1])
    enhanced = np.stack([store.read(ARRAY, i)[:h, :w] for i in members])
    return method.segment_enhanced(enhanced)


def _png_name(index) -> str:
    r, c = (int(v) for v in index)
    return f"tile_{r:04d}_{c:04d}.png"


def check_png_folder(store, folder: Path, overwrite: bool) -> None:
    """Before any work: ``folder`` can take the tiles' PNGs. A PNG there of the same name is replaced only with
    ``overwrite`` and only when nucli wrote it (:func:`nucli.outputs.check_replaceable`); other files stay."""
    from nucli.export._atomic import check_writable
    from nucli.outputs import check_replaceable

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--png {folder} is a file; --png names a folder for the enhanced tiles of a run store")
    check_writable(folder / "tile.png")
    if folder.is_dir():
        for index in store.indices():
            check_replaceable(folder / _png_name(index), overwrite)


def write_pngs(store, folder: Path) -> int:
    """Every enhanced tile as ``folder/tile_<row>_<col>.png`` (each written whole, carrying nucli's PNG
    marker); returns the count."""
    from PIL import Image

    from nucli.export._atomic import AtomicFile
    from nucli.outputs import png_info
    from nucli.pipeline import tile_extents

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    idx = store.indices()
    extents = tile_extents(store)
    done = store.done(STAGE)
    n = 0
    for i in np.flatnonzero(done):
        w, h = (int(v) for v in extents[i])
        f = AtomicFile(folder / _png_name(idx[i]), binary=True)
        try:
            Image.fromarray(store.read(ARRAY, i)[:h, :w]).save(f.handle, format="PNG", pnginfo=png_info())
            f.commit()
        except BaseException:
            f.discard()
            raise
        n += 1
    return n
