"""Both cores busy: a method without a model post-processes a batch's tiles in parallel, a model's
post-processing runs beside its next batch, stitching prepares tiles on threads ahead of the merge
-- and every one of them gives the same outputs as one thread."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from nucli.export import make_sinks, resolve_outputs
from nucli.models.base import Method, MethodConfig, TileResult
from nucli.models.registry import build_method
from nucli.pipeline import SegmentJob, _segments_whole, has_model_step, segment_store, store_from_array
from nucli.stitching import ordered_map, stitch_store, usable_cpus
from nucli.tiling.store import RunStore
from test_watershed import HE_BACKGROUND, HE_NUCLEUS, blob_labels, render


@pytest.fixture(scope="module")
def he_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("cores")
    gt = blob_labels(700, 560, 140, seed=9, r=(6, 10), touching_pairs=20)
    path = d / "run.zarr"
    store_from_array(path, render(gt, HE_NUCLEUS, HE_BACKGROUND, seed=9), tile_size=128, overlap=32,
                     source_mpp=0.5, fingerprint="cores-test")
    return path


def _copy(src, dest) -> RunStore:
    import shutil

    shutil.copytree(src, dest)
    return RunStore.open(dest, mode="r+")


# ----------------------------------------------------------------------------- ordered_map
def test_ordered_map_keeps_the_order_and_stays_a_few_items_ahead():
    lock = threading.Lock()
    started: list[int] = []

    def slow_square(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.002 * (i % 3))  # finish out of order
        return i * i

    consumed = 0
    out = []
    for v in ordered_map(slow_square, list(range(40)), threads=3, ahead=5):
        time.sleep(0.001)
        with lock:
            assert len(started) - consumed <= 5  # never more than `ahead` items computed ahead
        consumed += 1
        out.append(v)
    assert out == [i * i for i in range(40)]
    assert list(ordered_map(slow_square, [1, 2, 3], threads=1)) == [1, 4, 9]


def test_ordered_map_raises_the_workers_error_and_stops():
    calls: list[int] = []

    def boom(i: int) -> int:
        calls.append(i)
        if i == 3:
            raise ValueError("tile 3 is broken")
        return i

    with pytest.raises(ValueError, match="tile 3"):
        list(ordered_map(boom, list(range(100)), threads=2, ahead=4))
    assert len(calls) < 20  # the rest was never started


def test_usable_cpus_is_at_least_one_and_capped():
    assert 1 <= usable_cpus() and usable_cpus(1) == 1


# ----------------------------------------------------------------------------- stitching
def test_stitching_on_threads_writes_the_same_files(tmp_path, he_store):
    store = _copy(he_store, tmp_path / "run.zarr")
    segment_store(store, build_method("watershed"), batch_size=4, progress=False)
    texts = {}
    for threads in (1, 3):
        outs = resolve_outputs(tmp_path / f"t{threads}.geojson", ["csv"])
        stats = stitch_store(store, make_sinks(outs), progress=False, threads=threads)
        texts[threads] = [p.read_bytes() for p in outs.values()]
        assert stats.nuclei > 50
    assert texts[1] == texts[3]


def test_stitching_error_of_one_tile_reaches_the_caller_and_no_output_is_left(tmp_path, he_store, monkeypatch):
    import nucli.stitching as st

    store = _copy(he_store, tmp_path / "run.zarr")
    segment_store(store, build_method("watershed"), batch_size=4, progress=False)
    real = st.tile_nuclei

    def failing(labels, pixels, *, index, **kw):
        if index == 5:
            raise st.ProcessingError("tile 5 cannot be outlined")
        return real(labels, pixels, index=index, **kw)

    monkeypatch.setattr(st, "tile_nuclei", failing)
    outs = resolve_outputs(tmp_path / "x.geojson", [])
    with pytest.raises(st.ProcessingError, match="tile 5"):
        stitch_store(store, make_sinks(outs), progress=False, threads=2)
    assert not any(p.exists() for p in outs.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.geojson")]  # no temporary file left


# ----------------------------------------------------------------------------- segmentation
class _Threads(Method):
    """A method without a model step that records the threads its post-processing ran on."""

    def __init__(self):
        super().__init__(MethodConfig(name="threads", max_nucleus_diameter_px=32, batch_size=4))
        self.names: set[str] = set()
        self.inner = build_method("watershed")

    def postprocess(self, raw):
        self.names.add(threading.current_thread().name)
        return self.inner.postprocess(raw)


def test_a_method_without_a_model_post_processes_a_batch_on_every_cpu(tmp_path, he_store, monkeypatch):
    import nucli.stitching as st

    monkeypatch.setattr(st, "usable_cpus", lambda limit=None: 2)
    ref = _copy(he_store, tmp_path / "ref.zarr")
    segment_store(ref, build_method("watershed"), batch_size=4, progress=False, post_threads=1)
    store = _copy(he_store, tmp_path / "par.zarr")
    m = _Threads()
    assert not has_model_step(m) and has_model_step(build_method("harunet"))
    segment_store(store, m, batch_size=4, progress=False)  # post_threads: the pipeline's rule
    assert len(m.names) == 2  # two post-processing threads at once
    np.testing.assert_array_equal(ref.array("labels")[:], store.array("labels")[:])


def test_gensegnet_runs_its_model_and_its_post_processing_apart_with_the_same_labels(tmp_path, he_store):
    m = build_method("gensegnet")
    assert not _segments_whole(m) and has_model_step(m)
    store = _copy(he_store, tmp_path / "g.zarr")
    tiles = np.stack([store.read_tile(i) for i in range(3)])
    job = SegmentJob()
    kind, raw, pixels = job.compute(m, tiles)
    assert kind == "raw" and pixels is tiles  # the model step only: post-processing waits for finish()
    split = job._postprocess(m, raw, pixels)
    whole = m.segment(tiles)  # post-processing with the pale-object filter, as evaluate runs it
    for a, b in zip(split, whole):
        np.testing.assert_array_equal(a.labels, b.labels)
    threaded = SegmentJob(post_threads=2)._postprocess(m, raw, pixels)
    for a, b in zip(threaded, whole):
        np.testing.assert_array_equal(a.labels, b.labels)


class _PaleAware(Method):
    """Post-processing that needs the pixels: drops every object of a tile whose mean is bright."""

    def __init__(self):
        super().__init__(MethodConfig(name="pale", max_nucleus_diameter_px=32, batch_size=2))

    def infer(self, tiles):
        return np.asarray(tiles)[..., 0] < 100

    def postprocess(self, raw):
        from scipy import ndimage as ndi

        return [TileResult(labels=ndi.label(r)[0].astype(np.int32)) for r in np.asarray(raw)]

    def postprocess_tiles(self, raw, tiles):
        out = self.postprocess(raw)
        for r, t in zip(out, np.asarray(tiles)):
            if t.mean() > 200:
                r.labels[:] = 0
        return out


def test_post_processing_with_pixels_gets_each_tiles_own_pixels(tmp_path):
    from nucli.pipeline import tile_extents

    img = np.repeat(np.linspace(140, 255, 640).astype(np.uint8)[None, :, None], 384, 0).repeat(3, 2)
    for y in range(20, 360, 60):
        for x in range(20, 620, 50):
            img[y:y + 12, x:x + 12] = 0  # dark squares from the dim left to the bright right
    store = store_from_array(tmp_path / "p.zarr", img, tile_size=128, overlap=16, source_mpp=0.5, fingerprint="px")
    m = _PaleAware()
    segment_store(store, m, batch_size=2, progress=False, post_threads=2)
    labels = np.asarray(store.array("labels")[:])
    kept = 0
    for i, (w, h) in enumerate(tile_extents(store)):
        w, h = int(w), int(h)
        direct = m.segment(store.read_tile(i)[:h, :w][None])[0].labels
        np.testing.assert_array_equal(labels[i][:h, :w], direct)
        kept += int(direct.max() > 0)
    assert 0 < kept < store.n_tiles  # some tiles keep their squares, the bright ones drop them
