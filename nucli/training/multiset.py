"""Training on several annotated sets at once, at one physical working scale.

A *set* is a folder with ``train/`` and ``val/`` (each ``images/`` + ``labels/``)
and an ``index.json`` (one row per image: id, modality, stain, mpp where known),
the layout of dsb2018, monuseg and bitdepth_nucseg.

**One scale.** Every image is resampled to the working scale before training:

* an image with a pixel size (``mpp`` in the index) by ``mpp / WORKING_MPP``;
* an image without one by ``REFERENCE_DIAMETER_PX / d``, where ``d`` is the median
  equivalent diameter of its *annotated* nuclei, so that its typical nucleus has the
  size a typical tissue nucleus has at the working scale (MoNuSeg's median,
  5.8 µm, is 16.6 px at 0.35 µm/px).

The factor is clamped to [1/4, 4]. Images are kept as RGB uint8 (gray images as
three equal channels) so that stain augmentation can work in optical density.

**Balance.** A batch draws each crop's set with the set's weight (documented in
:data:`DEFAULT_WEIGHTS`), then a modality of that set with probability
proportional to the square root of its image count (so DSB2018's few brightfield
images are seen more often than their share), then an image of that modality
uniformly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nucli.errors import InputError, UsageError

log = logging.getLogger("nucli.training")

WORKING_MPP = 0.35
REFERENCE_DIAMETER_PX = 17.0
MIN_FACTOR, MAX_FACTOR = 0.25, 4.0
#: set name -> sampling weight (sets not named get 1.0); H&E weighs most, as most users' slides are H&E
DEFAULT_WEIGHTS: dict[str, float] = {"monuseg": 0.40, "dsb2018": 0.35, "bitdepth_nucseg": 0.25}


@dataclass
class ScaledImage:
    set: str
    id: str
    modality: str
    rgb: np.ndarray  # (H, W, 3) uint8 at the working scale
    labels: np.ndarray  # (H, W) int32 at the working scale
    factor: float  # working px per source px
    how: str  # "mpp" or "nuclei"
    source_shape: tuple[int, int] = (0, 0)
    source_labels: np.ndarray | None = None  # kept for validation at the source resolution


@dataclass
class DataSet:
    name: str
    root: Path
    weight: float
    train: list[ScaledImage] = field(default_factory=list)
    val: list[ScaledImage] = field(default_factory=list)


def median_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent diameter (px) of the instances of a label image, None when empty."""
    areas = np.bincount(np.asarray(labels).ravel())[1:]
    areas = areas[areas > 0]
    if not areas.size:
        return None
    return float(np.median(np.sqrt(4.0 * areas / math.pi)))


def scale_factor(mpp: float | None, labels: np.ndarray) -> tuple[float, str]:
    """Working px per source px for one image: from its pixel size, else from its annotated nuclei."""
    if mpp is not None and math.isfinite(float(mpp)) and float(mpp) > 0:
        f, how = float(mpp) / WORKING_MPP, "mpp"
    else:
        d = median_diameter(labels)
        f, how = (1.0, "none") if d is None else (REFERENCE_DIAMETER_PX / d, "nuclei")
    return float(min(max(f, MIN_FACTOR), MAX_FACTOR)), how


def resample_rgb(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (anti-aliased when shrinking) of an (H, W, 3) uint8 image."""
    from skimage.transform import resize

    if tuple(rgb.shape[:2]) == tuple(shape):
        return rgb
    shrink = shape[0] < rgb.shape[0]
    out = resize(rgb, shape, order=1, anti_aliasing=shrink, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resample_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label image (nuclei that vanish are simply gone)."""
    if tuple(labels.shape) == tuple(shape):
        return labels
    h, w = labels.shape
    ys = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return labels[ys[:, None], xs[None, :]]


def as_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.dtype != np.uint8:  # 16-bit images: per-image stretch to 8 bits
        f = img.astype(np.float32)
        lo, hi = np.percentile(f, [0.5, 99.9])
        img = np.clip((f - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def read_index(root: Path) -> dict[str, dict[str, Any]]:
    path = Path(root) / "index.json"
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return {str(r["id"]): dict(r) for r in rows}
    except (json.JSONDecodeError, TypeError, KeyError, UnicodeDecodeError):
        raise InputError(f"{path}: not a list of rows with an 'id'") from None


def load_split(root: Path, split: str, name: str, keep_source: bool = False,
               limit: int | None = None) -> list[ScaledImage]:
    """All pairs of ``root/split`` at the working scale."""
    from nucli.training.data import list_pairs, read_pair

    index = read_index(root)
    out = []
    for img_path, lab_path in list_pairs(Path(root) / split)[:limit]:
        img, lab = read_pair(img_path, lab_path)
        row = index.get(img_path.stem, {})
        factor, how = scale_factor(row.get("mpp"), lab)
        rgb = as_rgb(img)
        shape = (max(1, round(lab.shape[0] * factor)), max(1, round(lab.shape[1] * factor)))
        out.append(ScaledImage(name, img_path.stem, str(row.get("modality") or "unknown"),
                               resample_rgb(rgb, shape), resample_labels(lab, shape).astype(np.int32), factor, how,
                               tuple(lab.shape), lab if keep_source else None))
    return out


def parse_data_args(items: list[Path], weights: dict[str, float] | None = None) -> list[DataSet]:
    """``--data`` folders -> sets. A folder with ``train/`` is a set; a manifest (.json) lists
    ``[{"path": DIR, "weight": W}, ...]``."""
    sets: list[DataSet] = []
    weights = {**DEFAULT_WEIGHTS, **(weights or {})}
    for item in items:
        item = Path(item)
        if item.is_file() and item.suffix.lower() == ".json":
            try:
                rows = json.loads(item.read_text(encoding="utf-8"))
                pairs = [(Path(r["path"]) if Path(r["path"]).is_absolute() else item.parent / r["path"],
                          float(r.get("weight", 1.0))) for r in rows]
            except (json.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
                raise InputError(f"{item}: a data manifest is a JSON list of {{\"path\": DIR, \"weight\": W}}") \
                    from None
        else:
            pairs = [(item, weights.get(item.name, 1.0))]
        for root, w in pairs:
            if not (root / "train" / "images").is_dir():
                raise InputError(f"--data {root} must hold train/images and train/labels (and val/, index.json), "
                                 "like ../shared/data/monuseg")
            if not (w >= 0 and math.isfinite(w)):
                raise UsageError(f"--data {root}: weight must be a number >= 0 (0: validation only), got {w}")
            sets.append(DataSet(root.name, root, w))
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise UsageError(f"--data names a set twice: {', '.join(names)}")
    return sets


def load_sets(sets: list[DataSet], cache_dir: Path | None = None, limit: int | None = None,
              val_limit: int | None = None) -> list[DataSet]:
    """Fill each set's train/val images (cached as .npz, keyed by file names, sizes and the scale constants)."""
    for s in sets:
        for split in ("train", "val"):
            if not (s.root / split / "images").is_dir():
                continue
            lim = limit if split == "train" else val_limit
            key = _cache_key(s.root / split, lim)
            cache = Path(cache_dir) / f"ms-{s.name}-{split}-{key}.npz" if cache_dir else None
            if cache is not None and cache.exists():
                imgs = _read_cache(cache, s.name)
            else:
                imgs = load_split(s.root, split, s.name, keep_source=(split == "val"), limit=lim)
                if cache is not None:
                    _write_cache(cache, imgs)
            setattr(s, split, imgs)
        log.info("set %s: %d train, %d val images (weight %.2f)", s.name, len(s.train), len(s.val), s.weight)
    return sets


def _cache_key(split_dir: Path, limit: int | None) -> str:
    from nucli.training.data import list_pairs

    pairs = list_pairs(split_dir)[:limit]
    text = "|".join(f"{a.name}:{a.stat().st_size}:{b.stat().st_size}" for a, b in pairs)
    text += f"|{WORKING_MPP}|{REFERENCE_DIAMETER_PX}|{MIN_FACTOR}|{MAX_FACTOR}|v1"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _write_cache(path: Path, imgs: list[ScaledImage]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"meta": np.array(json.dumps(
        [{"id": m.id, "modality": m.modality, "factor": m.factor, "how": m.how, "source_shape": m.source_shape}
         for m in imgs]))}
    for i, m in enumerate(imgs):
        arrays[f"rgb{i}"] = m.rgb
        arrays[f"lab{i}"] = m.labels
        if m.source_labels is not None:
            arrays[f"src{i}"] = m.source_labels
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _read_cache(path: Path, name: str) -> list[ScaledImage]:
    z = np.load(path, allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    return [ScaledImage(name, m["id"], m["modality"], z[f"rgb{i}"], z[f"lab{i}"], float(m["factor"]), m["how"],
                        tuple(m["source_shape"]), z[f"src{i}"] if f"src{i}" in z.files else None)
            for i, m in enumerate(meta)]


def is_brightfield_modality(modality: str) -> bool:
    return modality.startswith("brightfield")


class MultiSetSampler:
    """Balanced, augmented crops from several sets at the working scale.

    ``targets(labels) -> dict of (S, S) arrays`` computes a method's targets from the
    augmented crop's labels (so geometry and targets always agree). ``next()`` returns
    ``x`` (B, 1, S, S) float32 (the same gray normalisation as inference) plus each
    target stacked over the batch. Its state is its numpy generator (resumable).
    """

    def __init__(self, sets: list[DataSet], crop: int, batch: int, targets: Callable[[np.ndarray], dict],
                 seed: int = 0, stain_aug: bool = True, scale_jitter: tuple[float, float] = (0.8, 1.25),
                 channels: int = 1):
        self.channels = int(channels)
        self.sets = [s for s in sets if s.train and s.weight > 0]  # weight 0: a validation-only set
        if not self.sets:
            raise InputError("no training images in any --data set")
        self.crop, self.batch, self.targets = crop, batch, targets
        self.stain_aug, self.scale_jitter = stain_aug, scale_jitter
        self.rng = np.random.default_rng(seed)
        w = np.array([s.weight for s in self.sets], dtype=np.float64)
        self.set_p = w / w.sum()
        self.by_modality = []
        for s in self.sets:
            groups: dict[str, list[int]] = {}
            for i, m in enumerate(s.train):
                groups.setdefault(m.modality, []).append(i)
            names = sorted(groups)
            p = np.sqrt([len(groups[n]) for n in names])
            self.by_modality.append((names, [groups[n] for n in names], p / p.sum()))

    def probabilities(self) -> dict[str, dict[str, float]]:
        """Set -> modality -> probability that a crop comes from it (for the model card)."""
        out = {}
        for s, sp, (names, _, mp) in zip(self.sets, self.set_p, self.by_modality):
            out[s.name] = {n: round(float(sp * p), 4) for n, p in zip(names, mp)}
        return out

    def draw(self) -> ScaledImage:
        rng = self.rng
        k = int(rng.choice(len(self.sets), p=self.set_p))
        names, groups, mp = self.by_modality[k]
        g = groups[int(rng.choice(len(names), p=mp))]
        return self.sets[k].train[g[int(rng.integers(len(g)))]]

    def crop_one(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """One augmented (rgb, labels) crop of size S and whether it is brightfield."""
        from nucli.training.stain_aug import acquisition_augment, hed_augment

        rng, s = self.rng, self.crop
        img = self.draw()
        z = float(np.exp(rng.uniform(np.log(self.scale_jitter[0]), np.log(self.scale_jitter[1]))))
        win = max(8, int(round(s / z)))
        h, w = img.labels.shape
        y0 = int(rng.integers(0, max(h - win, 0) + 1))
        x0 = int(rng.integers(0, max(w - win, 0) + 1))
        rgb = img.rgb[y0:y0 + win, x0:x0 + win]
        lab = img.labels[y0:y0 + win, x0:x0 + win]
        out = (min(s, round(rgb.shape[0] * z)), min(s, round(rgb.shape[1] * z)))
        rgb, lab = resample_rgb(rgb, out), resample_labels(lab, out)
        ph, pw = s - rgb.shape[0], s - rgb.shape[1]
        bright = is_brightfield_modality(img.modality)
        if ph or pw:  # small images: pad with the background colour
            fill = 255 if bright else 0
            rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), constant_values=fill)
            lab = np.pad(lab, ((0, ph), (0, pw)))
        k = int(rng.integers(4))
        rgb, lab = np.rot90(rgb, k), np.rot90(lab, k)
        if rng.integers(2):
            rgb, lab = rgb[:, ::-1], lab[:, ::-1]
        rgb, lab = np.ascontiguousarray(rgb), np.ascontiguousarray(lab)
        if self.stain_aug:
            if bright and img.modality == "brightfield-color":
                rgb, _ = hed_augment(rgb, lab, rng)
            rgb = acquisition_augment(rgb, rng)
        return rgb, lab, bright

    def next(self) -> dict[str, np.ndarray]:
        from nucli.models.gensegnet.preprocess import normalize_channels
        from nucli.training.data import brightness_jitter

        xs: list[np.ndarray] = []
        tg: dict[str, list[np.ndarray]] = {}
        for _ in range(self.batch):
            rgb, lab, bright = self.crop_one()
            x = normalize_channels(rgb, self.channels)  # (C, H, W); the same jitter on every channel
            if self.stain_aug:
                x = brightness_jitter(x, self.rng)
            xs.append(x)
            for k, v in self.targets(lab).items():
                tg.setdefault(k, []).append(v)
        out = {"x": np.stack(xs).astype(np.float32)}
        out.update({k: np.stack(v) for k, v in tg.items()})
        return out

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def val_images(sets: list[DataSet], size: int, per_set_limit: int | None = None) -> dict[str, list[ScaledImage]]:
    """Centre crops (<= ``size`` square, at the working scale) of each set's val images."""
    out: dict[str, list[ScaledImage]] = {}
    for s in sets:
        crops = []
        for m in s.val[:per_set_limit]:
            h, w = m.labels.shape
            y0, x0 = max((h - size) // 2, 0), max((w - size) // 2, 0)
            sl = (slice(y0, y0 + size), slice(x0, x0 + size))
            crops.append(ScaledImage(m.set, m.id, m.modality, m.rgb[sl], m.labels[sl], m.factor, m.how))
        if crops:
            out[s.name] = crops
    return out


def mean_over_sets(per_set: dict[str, dict[str, float]], key: str) -> float:
    """Each set counted once."""
    vals = [m[key] for m in per_set.values() if key in m]
    return float(np.mean(vals)) if vals else float("nan")
