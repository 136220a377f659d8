"""Scoring predictions against ground truth: file pairs, folders, and data sets."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nucli.errors import InputError, OutputExistsError, ProcessingError, UsageError
from nucli.evaluation import geojson as gj
from nucli.evaluation.labels_io import (
    RASTER_SUFFIXES,
    LabelImage,
    is_zarr,
    kind_of,
    read_raster,
    read_rgb,
    read_zarr,
    stem_of,
    to_grid,
    write_labels_tif,
)
from nucli.evaluation.report import EvalReport, ImageRow
from nucli.metrics import score_image

log = logging.getLogger("nucli.evaluation")

#: ``on_image(done, total, name)`` after each scored image (progress display).
OnImage = Callable[[int, int, str], None]

DIR_SUFFIXES = RASTER_SUFFIXES + (".geojson", ".geojson.gz")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LIST_SHOWN = 5


@dataclass(frozen=True)
class Pair:
    name: str
    pred: Path
    gt: Path


# --------------------------------------------------------------------------- pairing


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:LIST_SHOWN])
    more = len(names) - LIST_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def index_dir(folder: Path, suffixes: tuple[str, ...] = DIR_SUFFIXES) -> dict[str, Path]:
    """Label inputs in ``folder`` by file stem (Zarr label images included)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if not is_zarr(p):
                continue
        elif not p.name.lower().endswith(suffixes):
            log.debug("ignoring %s (not a label file)", p)
            continue
        stem = stem_of(p)
        if stem in found:
            raise InputError(f"{folder}: two inputs for image '{stem}' ({found[stem].name}, {p.name}); keep one")
        found[stem] = p
    return found


def pair_inputs(pred: Path, gt: Path, allow_missing: bool = False) -> tuple[list[Pair], list[str]]:
    """Match predictions to ground truth: two files, or two folders by file stem.

    Returns the pairs and the names left without a counterpart (only when
    ``allow_missing``; otherwise a missing counterpart is an error listing them).
    """
    pred, gt = Path(pred), Path(gt)
    kp, kg = kind_of(pred), kind_of(gt)
    if (kp == "dir") != (kg == "dir"):
        raise UsageError(
            f"PRED ({pred}) and GT ({gt}) must both be folders or both be single files/stores"
        )
    if kp != "dir":
        return [Pair(stem_of(pred), pred, gt)], []
    preds, gts = index_dir(pred), index_dir(gt)
    if not preds:
        raise InputError(f"{pred}: no predictions found (.tif, .png, .npy, .geojson or Zarr)")
    if not gts:
        raise InputError(f"{gt}: no ground-truth label images found (.tif, .png, .npy, .geojson or Zarr)")
    no_gt = sorted(set(preds) - set(gts))
    no_pred = sorted(set(gts) - set(preds))
    if not allow_missing:
        if no_gt:
            raise InputError(
                f"no ground truth in {gt} for {len(no_gt)} prediction(s): {_listing(no_gt)} "
                "(pass --allow-missing to score only the images present in both)"
            )
        if no_pred:
            raise InputError(
                f"no prediction in {pred} for {len(no_pred)} ground-truth image(s): {_listing(no_pred)} "
                "(pass --allow-missing to score only the images present in both)"
            )
    common = sorted(set(preds) & set(gts))
    if not common:
        raise InputError(f"no image names in common between {pred} and {gt} (files are matched by name)")
    for name in no_gt:
        log.info("skipped %s: no ground truth", name)
    for name in no_pred:
        log.info("skipped %s: no prediction", name)
    return [Pair(n, preds[n], gts[n]) for n in common], sorted(no_gt + no_pred)


# --------------------------------------------------------------------------- reading a pair


def _read_any(path: Path) -> LabelImage | list:
    kind = kind_of(path)
    if kind == "raster":
        return LabelImage(read_raster(path))
    if kind == "zarr":
        return read_zarr(path)
    if kind == "geojson":
        return gj.load_features(path)
    raise InputError(f"{path} is a folder; give a label image, Zarr label image or GeoJSON file")


def read_pair(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(true, pred) label images on the ground truth's pixel grid."""
    gt = _read_any(gt_path)
    pred = _read_any(pred_path)
    if isinstance(gt, LabelImage):
        if gt.downsample != 1.0:
            raise InputError(
                f"{gt_path}: ground truth must be at full resolution (its nucli.downsample is {gt.downsample:g})"
            )
        true = gt.labels
    elif isinstance(pred, LabelImage) and pred.downsample == 1.0:
        true = gj.rasterize(gt, pred.labels.shape)
    else:
        shape = gj.bounds_shape(gt, gt_path)
        if isinstance(pred, list):
            other = gj.bounds_shape(pred, pred_path)
            shape = (max(shape[0], other[0]), max(shape[1], other[1]))
            if shape[0] * shape[1] > gj.MAX_RASTER_PIXELS:
                raise InputError(f"{pred_path} and {gt_path} together span {shape[1]} x {shape[0]} px, too large "
                                 "to rasterise for scoring (give the ground truth as a label image, or crop)")
        true = gj.rasterize(gt, shape)
    if isinstance(pred, LabelImage):
        labels = to_grid(pred, true.shape, pred_path, gt_path)
    else:
        labels = gj.rasterize(pred, true.shape)
    return true, labels


def evaluate_paths(
    pred: Path, gt: Path, *, allow_missing: bool = False, on_image: OnImage | None = None
) -> EvalReport:
    """Score a prediction file/folder against a ground-truth file/folder."""
    pairs, skipped = pair_inputs(pred, gt, allow_missing)
    rows = []
    for i, pair in enumerate(pairs):
        true, labels = read_pair(pair.pred, pair.gt)
        rows.append(ImageRow(pair.name, score_image(true, labels)))
        if on_image:
            on_image(i + 1, len(pairs), pair.name)
    info = {"mode": "files", "pred": str(pred), "gt": str(gt)}
    return EvalReport(rows, info, skipped)


# --------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class DatasetItem:
    id: str
    image: Path
    labels: Path
    modality: str | None


def _load_index(dataset: Path) -> dict[str, str]:
    """id -> modality from ``DIR/index.json`` or ``DIR/../index.json`` (empty if none)."""
    for candidate in (dataset / "index.json", dataset.parent / "index.json"):
        if candidate.is_file():
            try:
                rows = json.loads(candidate.read_text(encoding="utf-8"))
                return {str(r["id"]): str(r["modality"]) for r in rows if "modality" in r}
            except (json.JSONDecodeError, TypeError, KeyError, UnicodeDecodeError):
                raise InputError(
                    f"{candidate}: not a list of {{'id': ..., 'modality': ...}} rows"
                ) from None
    return {}


def _load_mpps(dataset: Path) -> dict[str, float]:
    """id -> pixel size (µm/px) from the index rows that have a usable ``mpp``."""
    for candidate in (dataset / "index.json", dataset.parent / "index.json"):
        if candidate.is_file():
            try:
                rows = json.loads(candidate.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return {}
            out = {}
            for r in rows if isinstance(rows, list) else []:
                v = r.get("mpp") if isinstance(r, dict) else None
                if isinstance(v, (int, float)) and not isinstance(v, bool) and 0.01 <= float(v) <= 20.0:
                    out[str(r.get("id"))] = float(v)
            return out
    return {}


def segment_at_mpp(method: Any, image: np.ndarray, image_mpp: float) -> tuple[np.ndarray, float]:
    """Segment an image of known pixel size at the method's working pixel size; labels at the image's size."""
    from nucli.autoscale import Zoomed

    zoom = float(image_mpp) / float(method.config.mpp)
    zoom = min(max(zoom, 0.125), 8.0)
    if abs(zoom - 1.0) < 1e-3:
        return np.asarray(method.segment(image[None])[0].labels), 1.0
    return Zoomed(method, image, zoom).native(), zoom


def dataset_items(
    dataset: Path, *, limit: int | None = None, modality: str | None = None, allow_missing: bool = False
) -> tuple[list[DatasetItem], list[str]]:
    """Images of ``DIR/images`` with their labels ``DIR/labels/<id>.tif``, sorted by id.

    Also returns the ids of images without labels (only when ``allow_missing``).
    """
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise InputError(f"dataset folder {dataset} does not exist")
    img_dir, lab_dir = dataset / "images", dataset / "labels"
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise InputError(f"{dataset} has no '{d.name}' folder (expected DIR/images/*.png and DIR/labels/*.tif)")
    images = index_dir(img_dir, IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"{img_dir}: no images (*.png) found")
    labels = index_dir(lab_dir, (".tif", ".tiff", ".png", ".npy"))
    missing = sorted(set(images) - set(labels))
    if missing and not allow_missing:
        raise InputError(
            f"no labels in {lab_dir} for {len(missing)} image(s): {_listing(missing)} "
            "(pass --allow-missing to skip them)"
        )
    index = _load_index(dataset)
    ids = sorted(set(images) & set(labels))
    if modality is not None:
        if not index:
            raise UsageError(f"--modality needs {dataset}/../index.json (id -> modality); none found")
        known = sorted(set(index.values()))
        if modality not in known:
            raise UsageError(f"unknown modality '{modality}'; known: {', '.join(known)}")
        ids = [i for i in ids if index.get(i) == modality]
        if not ids:
            raise InputError(f"no images of modality '{modality}' in {dataset}")
    if limit is not None:
        ids = ids[:limit]
    for name in missing:
        log.info("skipped %s: no labels", name)
    return [DatasetItem(i, images[i], labels[i], index.get(i)) for i in ids], missing


def evaluate_dataset(
    dataset: Path,
    method_name: str | None,
    *,
    weights: Path | None = None,
    limit: int | None = None,
    modality: str | None = None,
    save_predictions: Path | None = None,
    overwrite: bool = False,
    allow_missing: bool = False,
    on_image: OnImage | None = None,
    mpp: str | None = None,
    device: Any = "cpu",
    precision: str | None = None,
    tta: bool | None = None,
) -> EvalReport:
    """Run a method over ``DIR/images`` and score it against ``DIR/labels``.

    Each image is segmented whole (no tiling), as RGB uint8. Run time is the
    method's own time per image (reading and scoring excluded); the first
    image includes any one-off warm-up. An image whose pixel size is in the set's
    ``index.json`` (``mpp``) is resampled to the method's working pixel size and its
    labels brought back to the image's size. ``mpp="auto"``: each image without a
    pixel size is rescaled as far as its own nuclei call for (:mod:`nucli.autoscale`);
    the time then includes the first pass. ``device`` (``auto|cpu|cuda|cuda:N|mps``) and
    ``precision``: where the method runs (:mod:`nucli.parallel.device`). ``tta``: flip test-time
    augmentation (None: as the weights say).
    """
    from nucli.autoscale import AUTO, NATIVE, ratio_for, resolve_mode, segment_image_auto
    from nucli.parallel.device import build_on_device, resolve_device

    if mpp not in (None, AUTO, NATIVE):
        raise UsageError(f"--mpp with --dataset takes only 'auto' or 'native' (data set images have no pixel size), "
                         f"got {mpp}")
    dev = resolve_device(device)

    items, skipped = dataset_items(dataset, limit=limit, modality=modality, allow_missing=allow_missing)
    if save_predictions is not None:
        save_predictions = Path(save_predictions)
        if save_predictions.exists() and not save_predictions.is_dir():
            raise InputError(f"--save-predictions {save_predictions} exists and is not a folder")
        clash = [it.id for it in items if (save_predictions / f"{it.id}.tif").exists()]
        if clash and not overwrite:
            raise OutputExistsError(
                f"{save_predictions} already holds predictions for {len(clash)} image(s) "
                f"({_listing(clash)}); pass --overwrite to replace them"
            )
    method = build_on_device(method_name, weights, dev, precision, tta=tta)
    mpp = resolve_mode(mpp, method.config)  # no --mpp: auto for weights trained at one working scale
    mpps = _load_mpps(Path(dataset))
    rows = []
    zooms: list[float] = []
    mpp_zooms: list[float] = []
    for i, item in enumerate(items):
        image = read_rgb(item.image)
        true = read_raster(item.labels)
        if true.shape != image.shape[:2]:
            raise InputError(
                f"{item.labels}: size {true.shape[1]}x{true.shape[0]} differs from its image {item.image} "
                f"({image.shape[1]}x{image.shape[0]})"
            )
        t0 = time.perf_counter()
        if item.id in mpps:  # the index gives the pixel size: work at the method's own
            pred, z = segment_at_mpp(method, image, mpps[item.id])
            mpp_zooms.append(z)
        elif mpp == AUTO:
            pred, est = segment_image_auto(method, image)
            zooms.append(1.0 if est is None else est.zoom)
        else:
            pred = np.asarray(method.segment(image[None])[0].labels)
        seconds = time.perf_counter() - t0
        if pred.shape != true.shape:
            raise ProcessingError(
                f"method '{method.name}' returned labels of shape {pred.shape} for {item.image} "
                f"({true.shape[1]}x{true.shape[0]})"
            )
        if save_predictions is not None:
            write_labels_tif(pred, save_predictions / f"{item.id}.tif")
        mp = image.shape[0] * image.shape[1] / 1e6
        rows.append(ImageRow(item.id, score_image(true, pred), item.modality, seconds, mp))
        if on_image:
            on_image(i + 1, len(items), item.id)
    info = {
        "mode": "dataset",
        "dataset": str(dataset),
        "method": method.name,
        "weights": str(weights) if weights is not None else None,
        "limit": limit,
        "modality": modality,
        "method_config": method.config.to_dict(),
        **dev.record(),
    }
    if mpp_zooms:
        info["pixel_size_from_index"] = {"images": len(mpp_zooms), "working_mpp": float(method.config.mpp),
                                         "median_zoom": round(float(np.median(mpp_zooms)), 4)}
    if mpp == AUTO:
        info["mpp"] = AUTO
        info["auto_zoom"] = {"ratio": ratio_for(method.config),"images_enlarged": int(sum(z > 1 for z in zooms)),
                             "images_shrunk": int(sum(z < 1 for z in zooms)),
                             "zooms": {str(z): zooms.count(z) for z in sorted(set(zooms))}}
    return EvalReport(rows, info, skipped)
