"""MCF as a nucli method: detection + segmentation -> instances.

Per tile: the detection branch gives the normalised response and nucleus
centres; the segmentation network gives the nucleus probability ``p1``. The
foreground ``p1 > seg_threshold`` is split by a watershed of its (smoothed)
distance transform, seeded at the detected centres that fall inside it;
foreground components without any detected centre (nuclei the segmentation
branch found and the detection branch missed) become one nucleus each, seeded
at their deepest point. Two touching regions that no neck separates -- the
smaller of their distance peaks is less than ``neck_depth`` px above the
saddle between them -- are one nucleus the detection saw twice and are
merged (:func:`merge_without_neck`). Objects under ``min_area`` px are dropped.

``mode = "detection"`` is the paper's '-seg.' ablation (detection branch
alone): the response map binarised at ``det_threshold`` (t1), split by a
watershed of the response seeded at the detected centres; regions without a
centre are dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from nucli.errors import InputError, WeightsError
from nucli.models.base import Method, MethodConfig, TileResult
from nucli.models.mcf import CONFIG
from nucli.models.mcf.confidence import T1_PAPER

log = logging.getLogger("nucli.mcf")

NAME = "mcf"
MODES = ("full", "detection")

DEFAULT_PARAMS: dict[str, Any] = dict(CONFIG.params)


def instances_full(p1: np.ndarray, centres: np.ndarray, seg_threshold: float = 0.5, min_area: int = 8,
                   marker_radius: int = 2, neck_depth: float = 1.0) -> np.ndarray:
    """Segmentation probability + detected centres -> (H, W) int32 instance labels."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    from nucli.postprocess import fill_holes, relabel_sequential

    fg = np.asarray(p1) > seg_threshold
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    fg = fill_holes(fg)
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(fg).astype(np.float32), 1.0) * fg
    markers = np.zeros(fg.shape, np.int32)
    centres = np.asarray(centres, np.int64).reshape(-1, 2)
    inside = centres[fg[centres[:, 0], centres[:, 1]]] if len(centres) else centres
    _stamp(markers, inside, marker_radius, fg)
    comps, n = ndi.label(fg)
    if n:
        seeded = np.zeros(n + 1, bool)
        seeded[np.unique(comps[markers > 0])] = True
        seeded[0] = True
        missing = np.flatnonzero(~seeded)
        if len(missing):
            deepest = ndi.maximum_position(dist, comps, index=missing)
            _stamp(markers, np.asarray(deepest, np.int64).reshape(-1, 2), marker_radius, fg,
                   start=int(markers.max()) + 1)
    labels = watershed(-dist, markers, mask=fg)
    if neck_depth > 0:
        labels = merge_without_neck(labels, dist, neck_depth)
    return _drop_small(labels, min_area, relabel_sequential)


def merge_without_neck(labels: np.ndarray, dist: np.ndarray, depth: float) -> np.ndarray:
    """Merge touching regions that no neck separates.

    For two touching regions a, b with distance-map peaks ``Da``, ``Db`` and
    saddle ``s`` (the highest distance value along their shared boundary, a
    pixel pair's value being the smaller of the two), the regions are one
    nucleus seen twice when ``min(Da, Db) - s < depth``. Repeated until stable.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels, np.int64)
    dist = np.asarray(dist, np.float32)
    for _ in range(20):
        n = int(labels.max(initial=0))
        if n < 2:
            break
        peak = np.asarray(ndi.maximum(dist, labels, index=np.arange(n + 1)), np.float32)
        keys, saddles = [], []
        for a, b, da, db in ((labels[:, :-1], labels[:, 1:], dist[:, :-1], dist[:, 1:]),
                             (labels[:-1], labels[1:], dist[:-1], dist[1:])):
            m = (a != b) & (a > 0) & (b > 0)
            if m.any():
                lo, hi = np.minimum(a[m], b[m]), np.maximum(a[m], b[m])
                keys.append(lo * (n + 1) + hi)
                saddles.append(np.minimum(da[m], db[m]))
        if not keys:
            break
        key, sad = np.concatenate(keys), np.concatenate(saddles)
        order = np.argsort(key, kind="stable")
        key, sad = key[order], sad[order]
        uniq, start = np.unique(key, return_index=True)
        saddle = np.maximum.reduceat(sad, start)
        a_ids, b_ids = np.divmod(uniq, n + 1)
        merge = np.minimum(peak[a_ids], peak[b_ids]) - saddle < depth
        if not merge.any():
            break
        parent = np.arange(n + 1)

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b in zip(a_ids[merge], b_ids[merge]):
            ra, rb = find(int(a)), find(int(b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        roots = np.array([find(i) for i in range(n + 1)])
        labels = roots[labels]
    return labels.astype(np.int32)


def instances_detection(response: np.ndarray, centres: np.ndarray, det_threshold: float = T1_PAPER,
                        min_area: int = 8, marker_radius: int = 2) -> np.ndarray:
    """Detection branch alone ('-seg.'): binarised response split at the detected centres."""
    from skimage.segmentation import watershed

    from nucli.postprocess import relabel_sequential

    s = np.asarray(response, np.float32)
    fg = s > det_threshold
    centres = np.asarray(centres, np.int64).reshape(-1, 2)
    if not fg.any() or not len(centres):
        return np.zeros(s.shape, np.int32)
    markers = np.zeros(s.shape, np.int32)
    _stamp(markers, centres[fg[centres[:, 0], centres[:, 1]]], marker_radius, fg)
    if markers.max() == 0:
        return np.zeros(s.shape, np.int32)
    labels = watershed(-s, markers, mask=fg)
    return _drop_small(labels, min_area, relabel_sequential)


def _stamp(markers: np.ndarray, points: np.ndarray, radius: int, mask: np.ndarray, start: int = 1) -> None:
    h, w = markers.shape
    for i, (y, x) in enumerate(np.asarray(points, np.int64).reshape(-1, 2), start=start):
        y0, y1, x0, x1 = max(0, y - radius), min(h, y + radius + 1), max(0, x - radius), min(w, x + radius + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        disc = ((yy - y) ** 2 + (xx - x) ** 2 <= radius * radius) & mask[y0:y1, x0:x1] & (markers[y0:y1, x0:x1] == 0)
        markers[y0:y1, x0:x1][disc] = i


def _drop_small(labels: np.ndarray, min_area: int, relabel) -> np.ndarray:
    labels = np.asarray(labels, np.int32)
    if labels.max(initial=0) == 0:
        return labels
    areas = np.bincount(labels.ravel())
    small = areas < min_area
    small[0] = False
    if small.any():
        labels = np.where(small[labels], 0, labels)
    return relabel(labels).astype(np.int32)


class MCFMethod(Method):
    """Built once per worker by :func:`build`."""

    def __init__(self, config: MethodConfig, bank: Any, unet: Any | None, device: str = "cpu"):
        super().__init__(config)
        self.bank = bank
        self.unet = unet.eval() if unet is not None else None
        self.device = device
        self.p = {**DEFAULT_PARAMS, **(config.params or {})}
        if self.p["mode"] not in MODES:
            raise WeightsError(f"mcf mode must be one of {', '.join(MODES)}, got {self.p['mode']!r}")

    def infer(self, tiles: np.ndarray) -> list[dict[str, Any]]:
        from nucli.models.mcf.features import prepare
        from nucli.models.mcf.segnet import predict_p1

        tiles = np.asarray(tiles)
        if tiles.ndim == 3 and tiles.shape[-1] not in (3, 4):
            tiles = tiles[..., None]
        if tiles.ndim != 4 or tiles.shape[1] < 1 or tiles.shape[2] < 1:
            raise InputError(f"expected tiles of shape (B, H, W, 3), got {tiles.shape}")
        out = []
        for tile in tiles:
            prep = prepare(tile[..., 0] if tile.shape[-1] == 1 else tile)
            det = self.bank.detector.detect(prep)
            p1 = None
            if self.p["mode"] == "full" and self.unet is not None:
                p1 = predict_p1(self.unet, prep[0], self.device)
            out.append({"response": det.response, "centres": det.centres, "p1": p1})
        return out

    def postprocess(self, raw: list[dict[str, Any]]) -> list[TileResult]:
        from nucli.postprocess import drop_oversized

        p = self.p
        results = []
        for item in raw:
            if p["mode"] == "detection" or item["p1"] is None:
                lab = instances_detection(item["response"], item["centres"], float(p["det_threshold"]),
                                          int(p["min_area"]), int(p["marker_radius"]))
            else:
                lab = instances_full(item["p1"], item["centres"], float(p["seg_threshold"]), int(p["min_area"]),
                                     int(p["marker_radius"]), float(p["neck_depth"]))
            results.append(TileResult(labels=drop_oversized(lab, float(self.config.max_nucleus_diameter_px))))
        return results


# ---------------------------------------------------------------- weights
def save_mcf_weights(path: Path, bank: Any, unet: Any, params: dict[str, Any] | None = None,
                     extra: dict[str, str] | None = None) -> Path:
    """U-Net + template bank (templates and filters as tensors) -> a nucli weights file."""
    from nucli.models.weights_io import save_weights

    tensors = dict(bank.to_tensors())
    if unet is not None:
        tensors.update({f"unet.{k}": v for k, v in unet.state_dict().items()})
    cfg = CONFIG.to_dict()
    cfg["params"] = {**DEFAULT_PARAMS, **(params or {}), "bank": bank.describe()}
    if unet is None:
        cfg["params"]["mode"] = "detection"
    return save_weights(Path(path), tensors, NAME, cfg, extra=extra)


def build(config: MethodConfig, weights_path: Path | None, device: str = "cpu") -> MCFMethod:
    """Registry builder: load the bank and the U-Net once."""
    import torch

    from nucli.models.mcf.bank import Bank
    from nucli.models.mcf.segnet import build_unet
    from nucli.models.weights_io import load_into, load_weights

    if weights_path is None:
        raise WeightsError("mcf needs weights; train them with `nucli train --method mcf` and pass --weights FILE")
    tensors, stored = load_weights(Path(weights_path), NAME)
    stored_params = dict(stored.get("params") or {})
    params = {**DEFAULT_PARAMS, **stored_params}
    for key, value in (config.params or {}).items():  # explicit overrides (e.g. mode) win over stored ones
        if key not in ("bank", "unet") and value != DEFAULT_PARAMS.get(key, object()):
            params[key] = value
    bank = Bank.from_tensors(tensors, params.get("bank") or {}, str(weights_path))
    unet = None
    unet_tensors = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    if unet_tensors:
        unet = build_unet(tuple(params["unet"]["widths"]))
        load_into(unet, unet_tensors, weights_path, NAME)
        unet.to(torch.device(device))
    elif params.get("mode") == "full":
        params["mode"] = "detection"
    data = {**stored, **{k: v for k, v in config.to_dict().items() if k != "params"}}
    data["name"] = NAME
    data["params"] = params
    return MCFMethod(MethodConfig.from_dict(data), bank, unet, device=str(device))


def export_detection_only(weights: Path, out: Path) -> Path:
    """The same template bank without the U-Net: the detection branch alone ('-seg.' ablation)."""
    import json

    from nucli.models.weights_io import load_weights, read_metadata, save_weights

    tensors, config = load_weights(Path(weights), NAME)
    meta = read_metadata(Path(weights))
    config = dict(config)
    config["params"] = {**(config.get("params") or {}), "mode": "detection"}
    extra = {k: v for k, v in meta.items() if not k.startswith("nucli.") or k.startswith("nucli.train.")}
    extra["nucli.mcf.derived_from"] = json.dumps(Path(weights).name)
    return save_weights(Path(out), {k: v for k, v in tensors.items() if not k.startswith("unet.")}, NAME, config,
                        extra=extra)
