"""The Python API: segment an array, describe a slide, list the methods.

``import nucli`` exposes these lazily (``nucli.segment_array`` etc.); nothing
heavy is imported until a function is called.

* :func:`segment_array` -- an image in memory -> (instance labels, measurements
  table). It runs the same code as ``nucli segment``: the image is tiled into a
  temporary run store, every tile goes through the method, tiles are stitched
  (each nucleus exactly once) and measured by the exporters.
* :func:`slide_info` -- what ``nucli info`` prints: size, pyramid, pixel size,
  vendor, associated images, tissue, and the tiles and time a method would take.
* :func:`method_catalog` -- what ``nucli models`` prints: every registered
  method, its weights and their SHA-256 status, its pixel size, and the
  test-split metrics from its model card.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from nucli.errors import InputError, UsageError

log = logging.getLogger("nucli.api")

SNAP = 0.05  # a pixel-size ratio within 5 % of a whole number is snapped to it (as for slides)


# --------------------------------------------------------------------------- segment_array


def segment_array(
    image: np.ndarray,
    method: str | None = None,
    *,
    mpp: float | str | None = None,
    weights: str | Path | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    tta: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Find the nuclei of an in-memory image (``tta``: flip test-time augmentation, as ``--tta``).

    ``image``: (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA, uint8. ``method``:
    a registered method (default: the default method). ``mpp``: the image's
    pixel size in µm/px; when given, the image is resampled to the method's
    working pixel size (and back for the labels) and the table gets µm columns;
    ``"auto"``: it is zoomed as far as its nuclei call for (:mod:`nucli.autoscale`);
    ``"native"``: it is used at its own resolution. Not given: ``auto`` for weights
    trained at one working scale, else native.

    Returns ``(labels, table)``: ``labels`` int32 (H, W), 0 = background, one id
    per nucleus; ``table`` a dict of equal-length columns (``label``,
    ``centroid_x_px``, ``area_px2``, ``eccentricity``, ... as in the measurements
    CSV of ``nucli segment``), one row per nucleus, ``table["label"][k]`` being
    its id in ``labels`` (``pandas.DataFrame(table)`` makes a data frame).
    """
    import tempfile

    from nucli.export.labels import LabelImageSink
    from nucli.models.registry import build_method
    from nucli.pipeline import segment_store, store_from_array
    from nucli.postprocess import as_rgb
    from nucli.stitching import stitch_store

    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise InputError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise InputError(f"expected a uint8 image, got {arr.dtype}; scale it to 0-255 first")
    if min(arr.shape[:2]) < 1:
        raise InputError(f"the image is empty (shape {arr.shape})")
    from nucli.autoscale import AUTO, NATIVE, choose_zoom, estimate_for, resize_rgb, resolve_mode, scans

    text = mpp.strip().lower() if isinstance(mpp, str) else None
    if isinstance(mpp, str) and text not in (AUTO, NATIVE):
        raise UsageError(f"mpp must be a positive number of µm per pixel, 'auto' or 'native', got '{mpp}'")
    mpp = text if isinstance(mpp, str) else mpp
    if mpp is not None and not isinstance(mpp, str) and not (math.isfinite(mpp) and mpp > 0):
        raise UsageError(f"mpp must be a positive number of µm per pixel, got {mpp}")
    rgb = np.ascontiguousarray(as_rgb(arr))
    m = build_method(method, weights=Path(weights) if weights is not None else None, device=device,
                     tta=True if tta else None)
    cfg = m.config
    mpp = resolve_mode(mpp, cfg)  # None: auto for weights trained at one working scale
    auto = mpp == AUTO
    if auto:
        mpp = None
    h0, w0 = rgb.shape[:2]
    tile = int(tile_size or cfg.tile_size)
    ov = int(cfg.overlap if overlap is None else overlap)

    def run(d: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        work = rgb if d == 1.0 else _resize_rgb(rgb, d)
        with tempfile.TemporaryDirectory(prefix="nucli-") as tmp:
            store = store_from_array(Path(tmp) / "run.zarr", work, tile_size=tile, overlap=ov, downsample=d,
                                     source_mpp=mpp, level0_size=(w0, h0), fingerprint="array")
            segment_store(store, m, batch_size=batch_size, progress=progress)
            labels_w = np.zeros(work.shape[:2], np.int32)
            rows = _TableSink()
            stitch_store(store, [LabelImageSink(array=labels_w), rows], progress=progress)
        return (labels_w if d == 1.0 else _resize_labels(labels_w, (h0, w0))), rows.table()

    if auto and scans(cfg):  # search the zoom on up to 4 crops, then run the pipeline once at it
        probes = _probe_crops(rgb, tile)

        def at(z: float) -> list[np.ndarray]:
            return [np.asarray(m.segment((p if z == 1.0 else resize_rgb(p, z))[None])[0].labels) for p in probes]

        est = choose_zoom(cfg, at)[0]
        return run(1.0 / est.zoom if est is not None else 1.0)
    labels, table = run(_downsample(mpp, cfg.mpp))
    if auto:
        est = estimate_for(cfg, [labels])
        if est is not None and est.zoom != 1.0:
            labels, table = run(1.0 / est.zoom)
    return labels, table


def _probe_crops(rgb: np.ndarray, size: int, n: int = 4) -> list[np.ndarray]:
    """Up to ``n`` crops of at most ``size`` px, spread over the image (the whole image when it is small)."""
    h, w = rgb.shape[:2]
    if h <= size and w <= size:
        return [rgb]
    ys = np.linspace(0, max(h - size, 0), 2).astype(int)
    xs = np.linspace(0, max(w - size, 0), 2).astype(int)
    crops = {(int(y), int(x)) for y in ys for x in xs}
    return [rgb[y:y + size, x:x + size] for y, x in sorted(crops)][:n]


def _downsample(mpp: float | None, working_mpp: float | None) -> float:
    """Input px per working px (1.0 when the pixel size is unknown or close enough)."""
    if mpp is None or not working_mpp:
        return 1.0
    d = float(working_mpp) / float(mpp)
    n = round(d)
    if n >= 1 and abs(d - n) <= SNAP * n:
        return float(n)
    return d


def _resize_rgb(rgb: np.ndarray, d: float) -> np.ndarray:
    from skimage.transform import resize

    h, w = rgb.shape[:2]
    shape = (max(1, int(math.floor(h / d + 1e-6))), max(1, int(math.floor(w / d + 1e-6))))
    out = resize(rgb, shape, order=1, anti_aliasing=d > 1, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour: input pixel (y, x) takes working pixel floor((y + 0.5) * h / H)."""
    h, w = labels.shape
    ys = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return labels[ys[:, None], xs[None, :]]


class _TableSink:
    """Collects the measurement rows of every nucleus (the columns of the CSV export)."""

    def open(self, frame: Any) -> None:
        from nucli.export.measurements import columns

        self.brightfield = frame.brightfield
        self.cols = columns(has_mpp=frame.um_per_px is not None, brightfield=frame.brightfield,
                            has_scores=frame.has_scores)
        self.rows: list[dict[str, Any]] = []

    def add_tile(self, view: Any) -> None:
        pass

    def add(self, nucleus: Any) -> None:
        from nucli.export.measurements import row_values

        self.rows.append(row_values(nucleus, self.cols, self.brightfield))

    def flush(self, y_final: float) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def table(self) -> dict[str, np.ndarray]:
        cols = getattr(self, "cols", [])
        out: dict[str, np.ndarray] = {}
        for c in cols:
            values = [r[c.key] for r in self.rows]
            if c.key == "id":
                out[c.key] = np.array(values, dtype=object)
            elif c.key == "label":
                out[c.key] = np.array(values, dtype=np.int64)
            else:
                out[c.key] = np.array(values, dtype=np.float64)
        return out


# --------------------------------------------------------------------------- slide_info


def slide_info(
    path: str | Path,
    method: str | None = None,
    *,
    mpp: float | None = None,
    mpp_target: float | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    tissue_mask: bool = True,
    probe_tiles: int = 2,
    weights: str | Path | None = None,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Describe a slide and estimate a run of ``method`` on it (see module docstring).

    The time estimate comes from running the method on ``probe_tiles`` tiles of
    this slide on this machine (0: no estimate), on ``device`` (``auto|cpu|cuda|cuda:N|mps``);
    it covers reading and segmenting tiles, not stitching or export. ``device``,
    ``gpu`` and ``devices`` (all this machine has) are in the result.
    """
    from nucli.parallel.device import available_devices, resolve_device

    from nucli.models.registry import get_spec
    from nucli.slide import open_slide
    from nucli.tiling import tissue as tissue_mod
    from nucli.tiling.grid import TileGrid

    if probe_tiles < 0:
        raise UsageError(f"--probe must be 0 or more tiles, got {probe_tiles}")
    dev = resolve_device(device)
    spec = get_spec(method)
    cfg = spec.config
    tile = int(tile_size or cfg.tile_size)
    ov = int(cfg.overlap if overlap is None else overlap)
    if not 0 <= ov < tile:
        raise UsageError(f"--overlap must be in [0, tile size {tile}), got {ov}")
    path = Path(path).expanduser()
    with open_slide(path, mpp=mpp) as slide:
        props = slide.properties
        info: dict[str, Any] = {
            "path": str(path),
            "file_size_mb": round(path.stat().st_size / 1e6, 3),
            "vendor": slide.vendor,
            "reader": slide.backend,
            "width": int(slide.dimensions[0]),
            "height": int(slide.dimensions[1]),
            "levels": [
                {"level": i, "width": int(w), "height": int(h), "downsample": round(float(ds), 4)}
                for i, ((w, h), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples))
            ],
            "mpp": slide.mpp,
            "mpp_from": "--mpp" if mpp is not None else ("metadata" if slide.mpp else None),
            "objective_power": _number(props.get("openslide.objective-power")),
            "associated_images": _associated_sizes(slide, props),
            "modality": "fluorescence" if slide.dark_background else "brightfield",
            **dev.record(),
            "devices": available_devices(),
        }
        if slide.mpp:
            info["size_mm"] = [round(info["width"] * slide.mpp / 1000, 3), round(info["height"] * slide.mpp / 1000, 3)]

        # what a run of the method would do (the same rules as `nucli tile`)
        if slide.mpp is None and mpp_target is not None:
            raise InputError(f"{path} has no pixel size in its metadata; pass --mpp")
        target = (mpp_target if mpp_target is not None else cfg.mpp) if slide.mpp else None
        working = slide.resolve_working_mpp(target)
        ds = slide.downsample_for(working)
        wsize = slide.working_size(working)
        grid = TileGrid(wsize[0], wsize[1], tile, ov)
        tiles = grid.all_tiles()
        fraction = None
        if tissue_mask:
            mask, mask_ds = tissue_mod.tissue_mask(slide)
            fraction = float(mask.mean())
            tiles = tissue_mod.tiles_with_tissue(grid, mask, mask_ds, ds)
        info.update({
            "tissue_fraction": None if fraction is None else round(fraction, 4),
            "method": spec.name,
            "working_mpp": working,
            "downsample": round(ds, 6),
            "working_size": [int(wsize[0]), int(wsize[1])],
            "tile_size": tile,
            "overlap": ov,
            "grid_tiles": len(grid),
            "tiles": len(tiles),
        })
        if slide.mpp is None:
            info["note"] = "no pixel size: the slide would be processed at native resolution; pass --mpp"
        info.update(_estimate(slide, spec, tiles, grid, working, probe_tiles, weights, dev))
    return info


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _associated_sizes(slide: Any, props: dict[str, Any]) -> dict[str, list[int] | None]:
    out: dict[str, list[int] | None] = {}
    for name in slide.associated_images:
        w = props.get(f"openslide.associated.{name}.width")
        h = props.get(f"openslide.associated.{name}.height")
        if w is not None and h is not None:
            out[name] = [int(w), int(h)]
            continue
        try:
            a = slide.associated_images[name]
            out[name] = [int(a.shape[1]), int(a.shape[0])]
        except Exception:  # noqa: BLE001 - a damaged associated image must not stop `info`
            out[name] = None
    return out


def _estimate(slide: Any, spec: Any, tiles: list, grid: Any, working: float | None, probe: int,
              weights: str | Path | None, device: Any = None) -> dict[str, Any]:
    """Seconds per tile measured on ``probe`` tiles of this slide; the time for all tiles."""
    if probe == 0 or not tiles:
        return {"seconds_per_tile": None, "estimated_seconds": None,
                "estimate": "not measured (--probe 0)" if probe == 0 else "no tiles"}
    from nucli.errors import WeightsError
    from nucli.parallel.device import CPU, build_on_device

    t0 = time.perf_counter()
    device = device or CPU
    try:
        m = build_on_device(spec.name, weights, device)
    except WeightsError as exc:
        return {"seconds_per_tile": None, "estimated_seconds": None, "estimate": f"not measured: {exc}"}
    load = time.perf_counter() - t0
    from nucli.tiling.grid import spread

    picks = spread(len(tiles), probe)
    times = []
    for k in picks:
        r, c = tiles[k]
        x, y = grid.origin(r, c)
        w, h = grid.extent(r, c)
        t = time.perf_counter()
        pixels = slide.read_working(x, y, w, h, working)
        m.segment(pixels[None])
        times.append(time.perf_counter() - t)
    # the first call pays one-off costs (lazy imports, kernel warm-up): leave it out when there are more
    per_tile = float(np.median(times[1:] if len(times) > 1 else times))
    return {
        "model_load_seconds": round(load, 3),
        "seconds_per_tile": round(per_tile, 4),
        "estimated_seconds": round(load + per_tile * len(tiles), 1),
        "estimate": f"{len(picks)} tiles of this slide segmented on this machine ("
                    + (device.describe() if device.gpu else f"{os.cpu_count()} CPUs")
                    + "); reading + segmenting, without stitching and export",
    }


# --------------------------------------------------------------------------- method_catalog

METRIC_KEYS = ("aji", "aji_plus", "dice", "dq", "sq", "pq", "precision", "recall", "f1")
_HEADER_ALIASES = {"aji": "aji", "aji+": "aji_plus", "aji plus": "aji_plus", "aji_plus": "aji_plus",
                   "dice": "dice", "dq": "dq", "sq": "sq", "pq": "pq", "precision": "precision",
                   "recall": "recall", "f1": "f1", "object f1": "f1", "detection f1": "f1"}


def method_catalog(verify: bool = True) -> list[dict[str, Any]]:
    """Every registered method: settings, weights (with SHA-256 status), model card, test metrics.

    ``verify`` hashes each shipped weights file (a few MB; fast).
    """
    from nucli.models.registry import DEFAULT_METHOD, available, sha256_of

    out = []
    for name, spec in sorted(available().items(), key=lambda kv: (kv[0] != DEFAULT_METHOD, kv[0])):
        cfg = spec.config
        entry: dict[str, Any] = {
            "name": name,
            "default": name == DEFAULT_METHOD,
            "summary": spec.summary,
            "mpp": cfg.mpp,
            "nucleus_diameter_px": cfg.nucleus_diameter_px,
            "max_nucleus_diameter_px": cfg.max_nucleus_diameter_px,
            "tile_size": cfg.tile_size,
            "overlap": cfg.overlap,
            "weights": spec.weights_file,
            "weights_path": str(spec.weights_path) if spec.weights_path else None,
            "sha256": None,
            "sha256_expected": spec.weights_sha256,
            "size_mb": None,
        }
        wp = spec.weights_path
        if wp is None:
            status = "not needed"
        elif not wp.exists():
            status = "missing" if spec.needs_weights else "not shipped (optional)"
        else:
            entry["size_mb"] = round(wp.stat().st_size / 1e6, 3)
            if verify:
                entry["sha256"] = sha256_of(wp)
            if spec.weights_sha256 is None:
                status = "present (no pinned SHA-256)"
            elif not verify:
                status = "present (not verified)"
            elif entry["sha256"] == spec.weights_sha256:
                status = "ok (SHA-256 verified)"
            else:
                status = "SHA-256 MISMATCH"
        entry["weights_status"] = status
        card = _card_path(spec)
        entry["card"] = str(card) if card is not None and card.exists() else None
        metrics, source = card_metrics(spec)
        entry["test_metrics"] = metrics
        entry["test_metrics_source"] = source
        entry["test_subset"] = _test_subset(spec) if metrics else None
        entry["licence"] = weights_licence(spec)
        out.append(entry)
    return out


def weights_licence(spec: Any) -> str | None:
    """The licence of a method's shipped weights: ``licence`` in the JSON beside them, else the
    weights file's ``nucli.licence`` metadata; None for a method without weights."""
    import json

    wp = spec.weights_path
    if wp is None:
        return None
    side = Path(wp).with_suffix(".json")
    if side.is_file():
        try:
            text = json.loads(side.read_text(encoding="utf-8")).get("licence")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            text = None
        if isinstance(text, str) and text:
            return text
    if Path(wp).is_file():
        from nucli.errors import WeightsError
        from nucli.models.weights_io import read_metadata

        try:
            return read_metadata(Path(wp)).get("nucli.licence")
        except WeightsError:
            return None
    return None


def card_metrics(spec: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Test-split metrics of a method: from the JSON beside its weights, else from its model card.

    JSON (``<weights stem>.json``): the first object found under a key containing
    ``test`` that holds metric names (``aji``, ``pq``, ``dice``, ``f1``, ...), or its
    ``mean_over_images`` part. Card (markdown): a table whose header names metrics,
    the first row labelled with ``test`` (or the first row of a table under a
    heading that mentions ``test``; among several, the row naming the method).
    """
    from nucli.models.registry import WEIGHTS_DIR

    # a method without weights may still have a card: <name>.json / <name>.md in the weights folder
    stem = spec.weights_file.split(".")[0] if spec.weights_file else spec.name
    side = WEIGHTS_DIR / f"{stem}.json"
    if side.exists():
        try:
            found = _metrics_in_json(json.loads(side.read_text()))
        except (OSError, ValueError):
            found = None
        if found:
            return found, side.name
    card = _card_path(spec)
    if card is not None and card.exists():
        try:
            found = metrics_in_markdown(card.read_text(), spec.name)
        except OSError:
            found = None
        if found:
            return found, card.name
    return None, None


def _test_subset(spec: Any) -> str | None:
    """A ``split`` named at the top of the JSON beside the weights when the metrics cover only part of it."""
    from nucli.models.registry import WEIGHTS_DIR

    stem = spec.weights_file.split(".")[0] if spec.weights_file else spec.name
    try:
        split = json.loads((WEIGHTS_DIR / f"{stem}.json").read_text()).get("split")
    except (OSError, ValueError, AttributeError):
        return None
    return split if isinstance(split, str) and "only" in split else None


def _card_path(spec: Any) -> Path | None:
    from nucli.models.registry import WEIGHTS_DIR

    return spec.card_path if spec.weights_file else WEIGHTS_DIR / f"{spec.name}.md"


def _as_metrics(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("mean_over_images"), dict):
        inner = _as_metrics(obj["mean_over_images"])
        if inner:
            return inner
    if isinstance(obj.get("aggregate"), dict):
        inner = _as_metrics(obj["aggregate"])
        if inner:
            return inner
    lower = {str(k).lower().replace("+", "_plus").replace("-", "_"): v for k, v in obj.items()}
    found = {k: float(lower[k]) for k in METRIC_KEYS if isinstance(lower.get(k), (int, float))}
    if len(found) < 2:
        return None
    for extra in ("split", "data", "dataset", "images", "n_images", "seconds_per_megapixel", "s_per_mp"):
        if extra in obj and isinstance(obj[extra], (str, int, float)):
            found[extra] = obj[extra]
    return found


def _metrics_in_json(obj: Any, under_test: bool = False) -> dict[str, Any] | None:
    if isinstance(obj, dict):
        if under_test:
            m = _as_metrics(obj)
            if m:
                return m
        for key, value in obj.items():
            hit = _metrics_in_json(value, under_test or "test" in str(key).lower())
            if hit:
                return hit
    elif isinstance(obj, list):
        for value in obj:
            hit = _metrics_in_json(value, under_test)
            if hit:
                return hit
    return None


_FLOAT = re.compile(r"^[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?$")


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def metrics_in_markdown(text: str, method: str | None = None) -> dict[str, Any] | None:
    """Test metrics from a markdown model card (see :func:`card_metrics`); ``method``
    picks its own row out of an ablation table."""
    heading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            heading = line.lower()
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("|-: "):
            header = [c.strip().lower().strip("*` ") for c in line.strip("|").split("|")]
            keys = [_HEADER_ALIASES.get(h) for h in header]
            i += 2
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip().strip("*` ") for c in lines[i].strip().strip("|").split("|")])
                i += 1
            if sum(k is not None for k in keys) < 2:
                continue
            def label_of(row: list[str]) -> str:
                return " ".join(row[j] for j, k in enumerate(keys) if k is None and j < len(row)).lower()

            tests = [r for r in rows if "test" in label_of(r)]
            if not tests and "test" in heading:
                tests = rows
            # an ablation table lists several rows: prefer the one naming the method itself
            named = [r for r in tests if method and _squash(method) in _squash(label_of(r))]
            pool = named or tests
            # per-modality rows: prefer the aggregate over all images
            overall = [r for r in pool if re.search(r"mean over images|\ball\b|overall|aggregate", label_of(r))]
            chosen = (overall or pool or [None])[0]
            if chosen is None:
                continue
            out: dict[str, Any] = {}
            for j, k in enumerate(keys):
                if k is not None and j < len(chosen) and _FLOAT.match(chosen[j].replace(",", "")):
                    out[k] = float(chosen[j].replace(",", ""))
            label = " ".join(chosen[j] for j, k in enumerate(keys) if k is None and j < len(chosen)).strip()
            if len(out) >= 2:
                if label:
                    out["row"] = label
                return out
            continue
        i += 1
    return None


__all__ = ["segment_array", "slide_info", "method_catalog", "card_metrics", "metrics_in_markdown"]
