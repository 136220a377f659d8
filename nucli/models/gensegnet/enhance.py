"""Enhancement as its own pipeline stage: enhanced tiles stored in the run store.

``enhance_store`` runs the GeNSeg-Net generator over every tile of a run store
that is not yet done and writes array ``enhanced`` (uint8 (N, T, T), 0 outside
the image) with ``done/enhance``; the generator settings are recorded as the
stage's settings so a rerun with other weights is refused without --overwrite.
``segment_store_from_enhanced`` is what ``segment`` uses when that stage is
complete: only the U-Net and the watershed run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

STAGE = "enhance"
ARRAY = "enhanced"


def stage_settings(method) -> dict:
    """What identifies the enhancement: method + a hash of the generator's weights."""
    import torch

    h = hashlib.sha256()
    for k, v in method.generator.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().to(torch.float32).cpu().numpy().tobytes())
    return {"method": method.name, "generator_sha256": h.hexdigest()[:16],
            "generator": json.dumps(method.config.params.get("generator"), sort_keys=True)}


def _batches(items: np.ndarray, size: int) -> Iterable[np.ndarray]:
    for k in range(0, len(items), size):
        yield items[k: k + size]


def enhance_store(store, method, *, batch_size: int | None = None, overwrite: bool = False,
                  advance: Callable[[int], None] | None = None) -> dict:
    """Enhance every pending tile of ``store``; returns counts."""
    from nucli.models.gensegnet.method import enhanced_to_uint8
    from nucli.pipeline import tile_extents

    store.set_stage_meta(STAGE, stage_settings(method), overwrite=overwrite)
    store.init_done(STAGE)
    t = store.tile_size
    store.ensure_array(ARRAY, (t, t), "uint8", fill_value=0)
    todo = np.flatnonzero(~store.done(STAGE))
    extents = tile_extents(store)
    bs = int(batch_size or method.config.batch_size or 1)
    for batch in _batches(todo, bs):
        groups: dict[tuple[int, int], list[int]] = {}
        for i in batch:
            groups.setdefault(tuple(int(v) for v in extents[i]), []).append(int(i))
        for (w, h), members in groups.items():
            pixels = np.stack([store.read_tile(i)[:h, :w] for i in members])
            enhanced = enhanced_to_uint8(method.enhance(pixels))
            for i, e in zip(members, enhanced):
                full = np.zeros((t, t), np.uint8)
                full[:h, :w] = e
                store.write(ARRAY, i, full)
                store.mark_done(STAGE, i)
                if advance is not None:
                    advance(1)
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


def write_pngs(store, folder: Path) -> int:
    """Every enhanced tile as ``folder/tile_<row>_<col>.png``; returns the count."""
    from PIL import Image

    from nucli.pipeline import tile_extents

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    idx = store.indices()
    extents = tile_extents(store)
    done = store.done(STAGE)
    n = 0
    for i in np.flatnonzero(done):
        w, h = (int(v) for v in extents[i])
        r, c = (int(v) for v in idx[i])
        Image.fromarray(store.read(ARRAY, i)[:h, :w]).save(folder / f"tile_{r:04d}_{c:04d}.png")
        n += 1
    return n
