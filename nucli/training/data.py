"""Training data: DIR/images/*.png + DIR/labels/*.tif -> normalised gray images, targets, random crops.

Images go through the same grayscale conversion and percentile normalisation
as inference (:mod:`nucli.models.gensegnet.preprocess`). Targets (ideal image,
3-class map) are computed once and cached beside the run's outputs.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nucli.errors import InputError

log = logging.getLogger("nucli.training")

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclass
class Sample:
    name: str
    x: np.ndarray  # (H, W) float16 in [0, 1], nuclei bright
    ideal: np.ndarray  # (H, W) float16 ideal-nucleus image
    cls: np.ndarray  # (H, W) uint8 3-class map
    labels: np.ndarray  # (H, W) int32 instance labels


def list_pairs(data_dir: Path) -> list[tuple[Path, Path]]:
    """Pairs (image, label) of a data directory; clear errors for a wrong layout."""
    data_dir = Path(data_dir)
    img_dir, lab_dir = data_dir / "images", data_dir / "labels"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise InputError(f"{data_dir} must hold images/ and labels/ folders (like dsb2018/train)")
    labels = {p.stem: p for p in lab_dir.iterdir() if p.suffix.lower() in (".tif", ".tiff", ".png")}
    pairs = []
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in labels:
            pairs.append((p, labels[p.stem]))
    if not pairs:
        raise InputError(f"{data_dir}: no image in images/ has a label of the same name in labels/")
    return pairs


def read_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    import tifffile
    from PIL import Image

    try:
        img = np.asarray(Image.open(image_path))
        lab = tifffile.imread(label_path) if label_path.suffix.lower() in (".tif", ".tiff") else np.asarray(
            Image.open(label_path))
    except Exception as exc:  # noqa: BLE001 - any decoder error is an input problem
        raise InputError(f"cannot read {image_path.name} / {label_path.name}: {exc}") from None
    lab = np.asarray(lab)
    if lab.ndim != 2 or lab.shape != img.shape[:2]:
        raise InputError(f"{label_path} must be a 2-D label image of the same size as {image_path.name}")
    return img, lab.astype(np.int32)


def load_dataset(data_dir: Path, cache_dir: Path | None = None, edge_half_width: int = 2,
                 limit: int | None = None) -> list[Sample]:
    """Read and prepare all pairs (cached as one .npz per data set in ``cache_dir``)."""
    from nucli.models.gensegnet.preprocess import normalize
    from nucli.training.targets import class_map, ideal_image

    pairs = list_pairs(data_dir)[:limit]
    key = hashlib.sha1(
        ("|".join(f"{a}:{a.stat().st_size}" for a, _ in pairs) + f"|{edge_half_width}").encode()
    ).hexdigest()[:12]
    cache = Path(cache_dir) / f"data-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        z = np.load(cache, allow_pickle=False)
        names = [str(n) for n in z["names"]]
        return [Sample(n, z[f"x{i}"], z[f"ideal{i}"], z[f"cls{i}"], z[f"lab{i}"]) for i, n in enumerate(names)]
    out = []
    for img_path, lab_path in pairs:
        img, lab = read_pair(img_path, lab_path)
        out.append(Sample(img_path.stem, normalize(img).astype(np.float16), ideal_image(lab).astype(np.float16),
                          class_map(lab, edge_half_width), lab))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"names": np.array([s.name for s in out])}
        for i, s in enumerate(out):
            arrays.update({f"x{i}": s.x, f"ideal{i}": s.ideal, f"cls{i}": s.cls, f"lab{i}": s.labels})
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(cache)
    log.info("prepared %d images from %s", len(out), data_dir)
    return out


def _crop_coords(rng: np.random.Generator, h: int, w: int, size: int) -> tuple[int, int]:
    return int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    ph, pw = max(size - a.shape[0], 0), max(size - a.shape[1], 0)
    return np.pad(a, ((0, ph), (0, pw))) if ph or pw else a


class CropSampler:
    """Random augmented crops: flips, 90° rotations, brightness/contrast/gamma on the input.

    ``next()`` returns float32 ``x`` (B, 1, S, S), ``ideal`` (B, 1, S, S) and int64
    ``cls`` (B, S, S). The sampler's state is its numpy generator (resumable).
    """

    def __init__(self, samples: list[Sample], crop: int, batch: int, seed: int = 0, augment: bool = True):
        if not samples:
            raise InputError("no training images")
        self.samples = samples
        self.crop = crop
        self.batch = batch
        self.augment = augment
        self.rng = np.random.default_rng(seed)

    def next(self) -> dict[str, np.ndarray]:
        rng, s = self.rng, self.crop
        xs, ids, cs = [], [], []
        for _ in range(self.batch):
            smp = self.samples[int(rng.integers(len(self.samples)))]
            h, w = smp.x.shape
            y0, x0 = _crop_coords(rng, h, w, s)
            sl = (slice(y0, y0 + s), slice(x0, x0 + s))
            x = _pad(smp.x[sl].astype(np.float32), s)
            ideal = _pad(smp.ideal[sl].astype(np.float32), s)
            c = _pad(smp.cls[sl], s)
            if self.augment:
                k = int(rng.integers(4))
                flip = bool(rng.integers(2))
                x, ideal, c = (np.rot90(a, k) for a in (x, ideal, c))
                if flip:
                    x, ideal, c = (a[:, ::-1] for a in (x, ideal, c))
                x = brightness_jitter(x, rng)
            xs.append(np.ascontiguousarray(x))
            ids.append(np.ascontiguousarray(ideal))
            cs.append(np.ascontiguousarray(c))
        return {"x": np.stack(xs)[:, None], "ideal": np.stack(ids)[:, None], "cls": np.stack(cs).astype(np.int64)}

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def brightness_jitter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random gamma, contrast and brightness on a [0, 1] image."""
    gamma = float(np.exp(rng.uniform(-0.4, 0.4)))
    scale = float(rng.uniform(0.75, 1.25))
    shift = float(rng.uniform(-0.1, 0.1))
    return np.clip(np.power(np.clip(x, 0, 1), gamma) * scale + shift, 0.0, 1.0).astype(np.float32)


def degrade(ideal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Make an ideal image look like an imperfect generator output (blur, noise, gain).

    ``ideal`` (B, 1, H, W) float32. Used when training the U-Net on ideal images,
    so it also copes with real enhanced images.
    """
    from scipy import ndimage as ndi

    out = np.empty_like(ideal)
    for i in range(ideal.shape[0]):
        a = ideal[i, 0]
        sigma = float(rng.uniform(0.0, 1.2))
        if sigma > 0.2:
            a = ndi.gaussian_filter(a, sigma)
        a = a * float(rng.uniform(0.85, 1.1)) + rng.normal(0.0, float(rng.uniform(0.0, 0.05)), a.shape)
        out[i, 0] = np.clip(a, 0.0, 1.0)
    return out.astype(np.float32)


def val_crops(samples: list[Sample], size: int, limit: int | None = None) -> list[Sample]:
    """Deterministic centre crops (at most ``size`` square) of validation images."""
    out = []
    for smp in samples[:limit]:
        h, w = smp.x.shape
        y0, x0 = max((h - size) // 2, 0), max((w - size) // 2, 0)
        sl = (slice(y0, y0 + size), slice(x0, x0 + size))
        out.append(Sample(smp.name, smp.x[sl], smp.ideal[sl], smp.cls[sl], smp.labels[sl]))
    return out
