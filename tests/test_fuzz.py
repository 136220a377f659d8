"""Fuzzing the readers nucli implements itself (bounded, deterministic): any input gives a valid
result or one of nucli's own errors (:class:`nucli.errors.NucliError`), never another exception.

* GeoJSON import used by ``nucli evaluate`` (:mod:`nucli.evaluation.geojson`);
* run-store metadata (``attrs["nucli"]`` read by :class:`nucli.tiling.store.RunStore` and the stages);
* the model config stored in weights files (:mod:`nucli.models.weights_io`, the GeNSeg-Net builder).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nucli.errors import NucliError

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# any JSON value, including the non-standard numbers Python's json module reads (NaN, Infinity)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=25)
numbers = st.integers(-(2**40), 2**40) | st.floats(allow_nan=True, allow_infinity=True)


# ====================================================================== GeoJSON (evaluate)
points = st.lists(numbers, min_size=0, max_size=4)
rings = st.lists(points, min_size=0, max_size=8) | json_values
geometries = st.fixed_dictionaries({
    "type": st.sampled_from(["Polygon", "MultiPolygon", "Point", "LineString", 7, None]),
    "coordinates": st.lists(rings, max_size=3) | st.lists(st.lists(rings, max_size=2), max_size=2) | json_values,
})
features = st.fixed_dictionaries(
    {"type": st.sampled_from(["Feature", "feature", None])},
    optional={"geometry": geometries | json_values, "nucleusGeometry": geometries, "properties": json_values},
)
documents = (
    st.fixed_dictionaries({"type": st.just("FeatureCollection")},
                          optional={"features": st.lists(features, max_size=4) | json_values})
    | st.lists(features | json_values, max_size=4)
    | features
    | geometries
    | json_values
)


def _check_geojson(doc) -> None:
    from nucli.evaluation import geojson as gj

    try:
        parsed = gj.parse_features(doc, "fuzz.geojson")
    except NucliError:
        return
    labels = gj.rasterize(parsed, (24, 32))
    assert labels.shape == (24, 32) and labels.min() >= 0 and labels.max() <= len(parsed)
    try:
        shape = gj.bounds_shape(parsed, "fuzz.geojson")
    except NucliError:
        return
    assert shape[0] >= 0 and shape[1] >= 0


@FUZZ
@given(documents)
@example({"type": "MultiPolygon", "coordinates": []})
def test_geojson_documents(doc):
    _check_geojson(doc)


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode), st.booleans())
def test_geojson_files_of_any_bytes(tmp_path, data, gz):
    from nucli.evaluation import geojson as gj

    path = tmp_path / ("x.geojson.gz" if gz else "x.geojson")
    path.write_bytes(gzip.compress(data) if gz and data[:1] != b"\x00" else data)
    try:
        parsed = gj.load_features(path)
    except NucliError:
        return
    gj.rasterize(parsed, (8, 8))


@FUZZ
@given(documents.map(lambda d: json.dumps(d, allow_nan=True)), st.integers(0, 60))
def test_geojson_text_cut_anywhere(tmp_path, text, cut):
    """A valid-looking document truncated at any point (a half-written file)."""
    from nucli.evaluation import geojson as gj

    path = tmp_path / "cut.geojson"
    path.write_text(text[: max(len(text) - cut, 0)])
    try:
        gj.load_features(path)
    except NucliError:
        pass


# ====================================================================== run-store metadata
@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    """A small segmented run store (4 tiles)."""
    from nucli.models.watershed import CONFIG, WatershedMethod
    from nucli.pipeline import segment_store, store_from_array
    from nucli.synthetic import ellipse_image

    img = ellipse_image((180, 150), [(40, 40), (120, 90), (60, 120)], radius=9)
    path = tmp_path_factory.mktemp("fuzzstore") / "run.zarr"
    store = store_from_array(path, img, tile_size=96, overlap=24, source_mpp=0.5)
    segment_store(store, WatershedMethod(CONFIG), progress=False)
    return path


META_KEYS = ["format_version", "n_tiles", "tile_size", "overlap", "channels", "working_size", "level0_size",
             "downsample", "source_mpp", "working_mpp", "stages", "source", "grid", "chunks_always_written"]
meta_edits = st.dictionaries(st.sampled_from(META_KEYS), json_values | st.integers(-3, 300), min_size=1, max_size=4)


def _use_store(path: Path) -> None:
    """What the stages read from a store's metadata."""
    from nucli.pipeline import tile_extents
    from nucli.stitching import frame_of
    from nucli.tiling.store import RunStore

    store = RunStore.open(path, mode="r")
    assert store.n_tiles >= 0 and store.tile_size >= 1 and 0 <= store.overlap < store.tile_size
    assert len(store.grid) >= store.n_tiles
    store.stage_meta("segment")
    store.done("segment")
    store.lost_tiles("labels", "segment")
    tile_extents(store)
    frame = frame_of(store)
    assert frame.downsample > 0 and frame.working_size[0] >= 1


def _use_store_with_metadata(path: Path, make_meta) -> None:
    """Replace the store's metadata by ``make_meta(original)``, use the store, restore the original."""
    import zarr

    g = zarr.open_group(str(path), mode="r+")
    original = dict(g.attrs["nucli"])
    try:
        g.attrs["nucli"] = make_meta(original)
        try:
            _use_store(path)
        except NucliError:
            pass
    finally:
        g.attrs["nucli"] = original


@FUZZ
@given(meta_edits, st.sets(st.sampled_from(META_KEYS), max_size=3))
def test_run_store_metadata(store_path, edits, removed):
    _use_store_with_metadata(
        store_path, lambda original: {k: v for k, v in {**original, **edits}.items() if k not in removed})


@FUZZ
@given(json_values)
def test_run_store_metadata_of_any_shape(store_path, value):
    _use_store_with_metadata(store_path, lambda original: value)


# ====================================================================== model config in weights files
def _write(path: Path, metadata: dict[str, str]) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(path), metadata=metadata)
    return path


@FUZZ
@given(st.text(max_size=80) | json_values.map(lambda v: json.dumps(v, allow_nan=True)),
       st.sampled_from(["gensegnet", "harunet", "", "GenSegNet"]))
def test_weights_config_text(tmp_path, config_text, method):
    from nucli.models.weights_io import load_weights

    path = _write(tmp_path / "w.safetensors", {"nucli.method": method, "nucli.config": config_text,
                                                "nucli.format": "1"})
    try:
        tensors, config = load_weights(path, "gensegnet")
    except NucliError:
        return
    assert isinstance(config, dict) and isinstance(config.get("params") or {}, dict) and "x" in tensors


small = st.integers(-2, 6)
net_params = st.fixed_dictionaries({}, optional={
    "generator": st.none() | json_values | st.fixed_dictionaries(
        {}, optional={"channels": small, "n_down": small, "n_blocks": small, "max_channels": small,
                      "input_skip": st.booleans() | json_values}),
    "unet": json_values | st.fixed_dictionaries({}, optional={"widths": st.lists(small, max_size=4) | json_values}),
    "postprocess": json_values,
    "bf16": json_values,
})


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(net_params)
@example({"unet": {"widths": []}})
@example({"generator": {"channels": -1}, "unet": {"widths": [4, 8]}})
def test_gensegnet_network_description(tmp_path, params):
    """Whatever network a weights file describes (small sizes only), building it from the file's tensors
    gives a method or a WeightsError."""
    from nucli.models.registry import build_method

    path = _write(tmp_path / "w.safetensors", {"nucli.method": "gensegnet", "nucli.format": "1",
                                                "nucli.config": json.dumps({"name": "gensegnet", "params": params})})
    try:
        build_method("gensegnet", weights=path)
    except NucliError:
        pass
