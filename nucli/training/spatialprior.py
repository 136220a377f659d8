"""Training the ``spatialprior`` method: unlabelled images + unpaired masks of another stain.

Networks (all trained jointly, Adam lr 2e-4, betas (0.5, 0.999)):

* S   -- U-Net segmentor (GeNSeg-Net's U-Net with instance normalisation), RGB tile -> one logit per pixel; its output
  ``S(t) = sigmoid(r * logits)`` is sharpened with ``r = 60`` so that it is
  almost binary, like a real mask;
* D_S -- PatchGAN discriminator: real, unpaired masks (label 1) vs S(t) (label 0);
* R   -- U-Net reconstructor, S(t) -> the tile t (L1), so that nuclei S misses
  cost reconstruction error;
* D_R -- PatchGAN discriminator on tiles vs reconstructions (CycleGAN-style).

Losses are least-squares GAN losses. With two colour augmentations c1, c2 of
the same tile::

    L_D = (D_S(m) - 1)^2 + D_S(S(c1 t))^2 + (D_R(t) - 1)^2 + D_R(R(S(c1 t)))^2
    L_G = (D_S(S(c1 t)) - 1)^2 + (D_R(R(S(c1 t))) - 1)^2
    L_R = |R(S(c1 t)) - t|_1          L_C = |S(c1 t) - S(c2 t)|_1
    L_system = L_D + L_G + L_R + L_C

S and R descend ``w_adv_s * ... + w_adv_r * ... + w_rec * L_R + w_cons * L_C`` (all
weights 1 by default, as in the paper); D_S and D_R descend L_D. The segmentor
kept is the one with the lowest windowed mean of L_system after a burn-in
(a fraction of the steps that discards the early instabilities).

Scale: the unlabelled tiles are rescaled at random (log-uniform around a
centre factor) before cropping, so their nuclei cover the prior masks' nucleus
sizes. ``scale="auto"`` sets the centre to (median nucleus diameter of the
prior masks) / (median diameter that the classical ``watershed`` method finds
on the unlabelled images) -- no annotation of the new stain is used -- and
stores it in the method config, so inference applies the same factor.

Outputs in ``out_dir``: ``sp.ckpt.safetensors`` (+ .json, all four networks and
both optimizers, resumable), ``sp.best.safetensors`` (S), ``sp.log.jsonl``,
``spatialprior_<preset>.safetensors`` (+ ``.json`` summary).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nucli.errors import InputError, UsageError

log = logging.getLogger("nucli.training")

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MASK_SUFFIXES = (".tif", ".tiff", ".png", ".npy")

PRESETS: dict[str, dict[str, Any]] = {
    # the paper's widths (GPU-sized): 64 filters in the last layer, 3-layer PatchGAN of 64 filters
    "paper": {
        "segmentor": {"widths": [64, 128, 256, 512]},
        "reconstructor": {"widths": [64, 128, 256, 512]},
        "discriminator": {"channels": 64, "layers": 3},
        "crop": 256, "batch": 8, "steps": 60000, "lr": 2e-4,
    },
    # small enough for a CPU core
    "cpu": {
        "segmentor": {"widths": [16, 32, 64, 128]},
        "reconstructor": {"widths": [16, 32, 64]},
        "discriminator": {"channels": 16, "layers": 3},
        "crop": 128, "batch": 4, "steps": 3000, "lr": 2e-4,
    },
}

DEFAULTS: dict[str, Any] = {
    "betas": (0.5, 0.999),
    "sharpen": 60.0,
    "weights": {"adv_s": 1.0, "adv_r": 1.0, "rec": 1.0, "cons": 1.0},
    "burn_in": 0.4,  # fraction of steps before model selection starts
    "select_window": 50,  # steps averaged for the selection criterion
    "scale_spread": 1.5,  # random rescaling within [centre / spread, centre * spread]
    "decay_start": 0.5,
    "ckpt_every": 100,
    "log_every": 10,
    # S is first fitted for a few steps to the masks the classical ``watershed``
    # method finds on the unlabelled images (no annotation involved); this fixes
    # the polarity (nuclei, not the gaps between them) that the adversarial loss
    # alone leaves open. 0 disables it (the paper's plain joint training).
    "warm_start": {"steps": 200, "lr": 1e-3},
}


# ---------------------------------------------------------------- networks and losses
def _patch_disc_class():
    import torch
    from torch import nn

    class PatchDiscriminator(nn.Module):
        """PatchGAN: stride-2 4x4 convolutions -> one real/fake score per overlapping patch.

        ``layers`` stride-2 blocks (the first without normalisation), one stride-1
        block and a 1-channel output convolution, as in pix2pix (there 64 filters,
        3 layers). Instance normalisation, LeakyReLU(0.2).
        """

        def __init__(self, in_ch: int = 1, channels: int = 64, layers: int = 3):
            super().__init__()
            mods: list[nn.Module] = [nn.Conv2d(in_ch, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
            c = channels
            for i in range(1, layers):
                c2 = channels * min(2 ** i, 8)
                mods += [nn.Conv2d(c, c2, 4, 2, 1, bias=False), nn.InstanceNorm2d(c2, affine=True),
                         nn.LeakyReLU(0.2, True)]
                c = c2
            c2 = channels * min(2 ** layers, 8)
            mods += [nn.Conv2d(c, c2, 4, 1, 1, bias=False), nn.InstanceNorm2d(c2, affine=True),
                     nn.LeakyReLU(0.2, True), nn.Conv2d(c2, 1, 4, 1, 1)]
            self.net = nn.Sequential(*mods)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    return PatchDiscriminator


def PatchDiscriminator(in_ch: int = 1, channels: int = 64, layers: int = 3):  # noqa: N802 - a factory
    """A PatchGAN discriminator module (torch imported lazily)."""
    return _patch_disc_class()(in_ch, channels, layers)


def lsgan_loss(pred, real: bool):
    """Least-squares GAN loss: mean (pred - 1)^2 for real targets, mean pred^2 for fake ones."""
    target = 1.0 if real else 0.0
    return ((pred - target) ** 2).mean()


def consistency_loss(a, b):
    """||a - b||_1 (mean over pixels): zero when both views give the same segmentation."""
    return (a - b).abs().mean()


def sharpen(logits, r: float = 60.0):
    """Sharpened segmentation ``sigmoid(r * logits)`` (almost binary for r = 60)."""
    import torch

    return torch.sigmoid(logits * r)


def colour_augment(x, gen=None):
    """Random colour jitter of (B, 3, H, W) tiles in [0, 1], one draw per tile.

    Per-channel gain, brightness, contrast, saturation and gamma -- the c1, c2
    of the consistency loss. ``gen`` is a ``torch.Generator`` (reproducible).
    """
    import torch

    b = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand((b, *shape, 1, 1), generator=gen, dtype=x.dtype)

    gain = u(0.85, 1.15, 3)
    y = x * gain + u(-0.08, 0.08, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * u(0.75, 1.3, 1) + mean
    gray = y.mean(dim=1, keepdim=True)
    y = gray + (y - gray) * u(0.6, 1.4, 1)
    y = y.clamp(1e-4, 1.0) ** torch.exp(u(-0.3, 0.3, 1))
    return y.clamp(0.0, 1.0)


def build_networks(preset: dict[str, Any]):
    """(S, R, D_S, D_R) for a preset."""
    from nucli.models.spatialprior import unet

    s = unet(preset["segmentor"]["widths"], 3, 1, preset["segmentor"].get("norm", "instance"))
    r = unet(preset["reconstructor"]["widths"], 1, 3, preset["reconstructor"].get("norm", "instance"))
    d = preset["discriminator"]
    return s, r, PatchDiscriminator(1, d["channels"], d["layers"]), PatchDiscriminator(3, d["channels"], d["layers"])


# ---------------------------------------------------------------- data
def _list_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return [p for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in suffixes and not p.name.startswith(".")]


def load_unlabelled(images_dir: Path, limit: int | None = None) -> list[np.ndarray]:
    """Every image of a folder as (H, W, 3) uint8 RGB (labels, if any lie beside them, are never read)."""
    from nucli.evaluation.labels_io import read_rgb

    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"--images {images_dir} is not a folder of images")
    files = _list_files(images_dir, IMAGE_SUFFIXES)[:limit]
    if not files:
        raise InputError(f"--images {images_dir}: no images (*.png, *.tif, *.jpg) found")
    out = []
    for p in files:
        img = read_rgb(p)
        if min(img.shape[:2]) < 16:
            raise InputError(f"{p} is smaller than 16 px; give larger images")
        out.append(img)
    return out


def mask_from_labels(labels: np.ndarray) -> np.ndarray:
    """Instance labels -> binary uint8 mask in which touching nuclei are parted by a 1-px gap.

    (A plain binarisation would merge touching nuclei into one blob and teach
    S to do the same.) A pixel is dropped when one of its 8 neighbours belongs
    to another nucleus.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    fg = labels > 0
    if labels.dtype == bool or labels.max(initial=0) <= 1:
        return fg.astype(np.uint8)
    lab = labels.astype(np.int64)
    big = np.iinfo(np.int64).max
    hi = ndi.maximum_filter(lab, size=3, mode="constant", cval=0)
    lo = ndi.minimum_filter(np.where(fg, lab, big), size=3, mode="constant", cval=big)
    touching = fg & ((hi != lab) | ((lo != lab) & (lo != big)))
    return (fg & ~touching).astype(np.uint8)


def load_prior_masks(masks_dir: Path, limit: int | None = None) -> list[np.ndarray]:
    """Label or mask images of ``masks_dir`` (or ``masks_dir/labels``) -> binary uint8 masks."""
    from nucli.evaluation.labels_io import read_raster

    masks_dir = Path(masks_dir)
    if (masks_dir / "labels").is_dir():
        masks_dir = masks_dir / "labels"
    if not masks_dir.is_dir():
        raise InputError(f"--prior-masks {masks_dir} is not a folder of label/mask images")
    files = _list_files(masks_dir, MASK_SUFFIXES)[:limit]
    if not files:
        raise InputError(f"--prior-masks {masks_dir}: no label or mask images (*.tif, *.png, *.npy)")
    out = []
    for p in files:
        m = mask_from_labels(read_raster(p))
        if m.any():
            out.append(m)
    if not out:
        raise InputError(f"--prior-masks {masks_dir}: every mask is empty; give masks with nuclei")
    return out


def median_diameter(labels_list: list[np.ndarray]) -> float:
    """Median equivalent diameter (px) of the instances of label images (0 when none)."""
    from scipy import ndimage as ndi

    ds = []
    for lab in labels_list:
        lab = np.asarray(lab)
        if lab.max(initial=0) <= 0:
            continue
        if lab.max() == 1:
            lab = ndi.label(lab > 0)[0]
        area = np.bincount(lab.ravel())[1:]
        ds.extend(2.0 * np.sqrt(area[area > 0] / np.pi))
    return float(np.median(ds)) if ds else 0.0


def estimate_scale(images: list[np.ndarray], masks: list[np.ndarray], limit: int = 40) -> dict[str, float]:
    """Centre rescaling factor: prior nucleus diameter / diameter the ``watershed`` method finds.

    Uses no annotation of the unlabelled images. Clipped to [0.25, 4].
    """
    from scipy import ndimage as ndi

    from nucli.models.registry import build_method

    ws = build_method("watershed")
    found = [ws.segment(img[None])[0].labels for img in images[:limit]]
    d_img = median_diameter(found)
    d_prior = median_diameter([ndi.label(m > 0)[0] for m in masks])
    scale = float(np.clip(d_prior / d_img, 0.25, 4.0)) if d_img > 0 and d_prior > 0 else 1.0
    return {"scale": scale, "prior_diameter_px": d_prior, "image_diameter_px": d_img}


class UnpairedSampler:
    """Random crops of unlabelled images (rescaled at random) and of unpaired prior masks.

    ``next()`` returns ``t`` (B, 3, S, S) float32 in [0, 1] and ``m`` (B, 1, S, S)
    float32 in {0, 1}; flips and 90° rotations on both. Resumable through
    ``state()`` / ``set_state()``.
    """

    def __init__(self, images: list[np.ndarray], masks: list[np.ndarray], crop: int, batch: int,
                 scale: float = 1.0, spread: float = 1.5, seed: int = 0):
        if not images or not masks:
            raise InputError("need unlabelled images and prior masks to train spatialprior")
        self.images, self.masks = images, masks
        self.crop, self.batch = int(crop), int(batch)
        self.scale, self.spread = float(scale), max(float(spread), 1.0)
        self.rng = np.random.default_rng(seed)

    def _geom(self, a: np.ndarray, k: int, flip: bool) -> np.ndarray:
        a = np.rot90(a, k)
        return np.ascontiguousarray(a[:, ::-1] if flip else a)

    def _image_crop(self, i: int | None = None, mask: np.ndarray | None = None):
        """A random window of image ``i`` (random when None) at a random scale, resized to the crop size.

        With ``mask`` (the image's own (H, W) mask) the same window of it is returned too
        (nearest-neighbour resize): ``(patch, mask_patch)``.
        """
        from PIL import Image

        rng, s = self.rng, self.crop
        img = self.images[int(rng.integers(len(self.images))) if i is None else i]
        f = self.scale * float(np.exp(rng.uniform(-np.log(self.spread), np.log(self.spread))))
        src = max(int(round(s / f)), 4)
        h, w = img.shape[:2]
        if h < src or w < src:
            py, px = max(src - h, 0), max(src - w, 0)
            img = np.pad(img, ((0, py), (0, px), (0, 0)), mode="reflect")
            if mask is not None:
                mask = np.pad(mask, ((0, py), (0, px)), mode="reflect")
            h, w = img.shape[:2]
        y0, x0 = int(rng.integers(0, h - src + 1)), int(rng.integers(0, w - src + 1))
        patch = img[y0:y0 + src, x0:x0 + src]
        if src != s:
            patch = np.asarray(Image.fromarray(patch).resize((s, s), Image.BILINEAR))
        patch = patch.astype(np.float32) / 255.0
        if mask is None:
            return patch
        m = mask[y0:y0 + src, x0:x0 + src]
        if src != s:
            m = np.asarray(Image.fromarray(m).resize((s, s), Image.NEAREST))
        return patch, m.astype(np.float32)

    def _mask_crop(self) -> np.ndarray:
        rng, s = self.rng, self.crop
        m = self.masks[int(rng.integers(len(self.masks)))]
        h, w = m.shape
        if h < s or w < s:
            m = np.pad(m, ((0, max(s - h, 0)), (0, max(s - w, 0))))
            h, w = m.shape
        y0, x0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        return m[y0:y0 + s, x0:x0 + s].astype(np.float32)

    def next(self) -> dict[str, np.ndarray]:
        ts, ms = [], []
        for _ in range(self.batch):
            t = self._geom(self._image_crop(), int(self.rng.integers(4)), bool(self.rng.integers(2)))
            m = self._geom(self._mask_crop(), int(self.rng.integers(4)), bool(self.rng.integers(2)))
            ts.append(t.transpose(2, 0, 1))
            ms.append(m[None])
        return {"t": np.stack(ts).astype(np.float32), "m": np.stack(ms).astype(np.float32)}

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class PseudoPairSampler(UnpairedSampler):
    """Crops of unlabelled images with the same crops of their pseudo-masks (for the warm start).

    ``next()`` returns ``t`` (B, 3, S, S) and ``m`` (B, 1, S, S): the pseudo-mask
    of the very pixels of ``t`` (same rescaling, flip and rotation).
    """

    def __init__(self, images: list[np.ndarray], pseudo: list[np.ndarray], crop: int, batch: int,
                 scale: float = 1.0, spread: float = 1.5, seed: int = 0):
        super().__init__(images, pseudo, crop, batch, scale, spread, seed)
        self.pseudo = pseudo

    def next(self) -> dict[str, np.ndarray]:
        rng = self.rng
        ts, ms = [], []
        for _ in range(self.batch):
            i = int(rng.integers(len(self.images)))
            t, m = self._image_crop(i, self.pseudo[i])
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            ts.append(self._geom(t, k, flip).transpose(2, 0, 1))
            ms.append(self._geom(m, k, flip)[None])
        return {"t": np.stack(ts).astype(np.float32), "m": np.stack(ms).astype(np.float32)}


def pseudo_masks(images: list[np.ndarray]) -> list[np.ndarray]:
    """Binary masks (touching nuclei parted) from the classical ``watershed`` method -- no annotation used."""
    from nucli.models.registry import build_method

    ws = build_method("watershed")
    return [mask_from_labels(ws.segment(img[None])[0].labels) for img in images]


def warm_start(S: Any, sampler: PseudoPairSampler, steps: int, lr: float, out_dir: Path, r: float = 60.0,
               seed: int = 0) -> dict[str, Any]:
    """Fit S to pseudo-masks for ``steps`` steps (BCE on the sharpened logits); cached in ``sp.warm.safetensors``."""
    import torch
    import torch.nn.functional as F

    from nucli.training.loop import LossLog, load_module, save_module

    path = Path(out_dir) / "sp.warm.safetensors"
    if path.exists():
        load_module(path, S)
        return {"steps": steps, "cached": True}
    logf = LossLog(Path(out_dir) / "sp.log.jsonl")
    gen = torch.Generator().manual_seed(seed + 11)
    opt = torch.optim.Adam(S.parameters(), lr=lr, betas=(0.9, 0.999))
    S.train()
    t0, running = time.time(), 0.0
    for step in range(1, steps + 1):
        b = sampler.next()
        t, m = colour_augment(torch.from_numpy(b["t"]), gen), torch.from_numpy(b["m"])
        loss = F.binary_cross_entropy_with_logits(S(t) * r, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if step % 10 == 0 or step == steps:
            logf.write(stage="warm", step=step, bce=running / (10 if step % 10 == 0 else step % 10),
                       elapsed=round(time.time() - t0, 1))
            running = 0.0
    save_module(path, S, {"steps": steps})
    return {"steps": steps, "wall_s": round(time.time() - t0, 1)}


# ---------------------------------------------------------------- the joint loop
def train_joint(nets: tuple, sampler: UnpairedSampler, cfg: dict[str, Any], out_dir: Path, name: str = "sp",
                resume: bool = False, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Train S, R, D_S, D_R jointly for ``cfg['steps']`` steps; keeps the S of lowest system loss."""
    import torch

    from nucli.training.loop import (InterruptGuard, LossLog, RunningMeans, linear_decay, load_checkpoint,
                                     load_module, save_checkpoint, save_module)

    S, R, DS, DR = nets
    steps = int(cfg["steps"])
    w = cfg["weights"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / f"{name}.ckpt.safetensors"
    best_path = out_dir / f"{name}.best.safetensors"
    logf = LossLog(out_dir / f"{name}.log.jsonl")
    opt_g = torch.optim.Adam(list(S.parameters()) + list(R.parameters()), lr=cfg["lr"], betas=cfg["betas"])
    opt_d = torch.optim.Adam(list(DS.parameters()) + list(DR.parameters()), lr=cfg["lr"], betas=cfg["betas"])
    gen = torch.Generator().manual_seed(seed + 7)
    modules = {"S": S, "R": R, "DS": DS, "DR": DR}
    step, best, best_step, elapsed, window = 0, None, -1, 0.0, []
    if resume and ckpt.exists():
        meta = load_checkpoint(ckpt, modules, {"g": opt_g, "d": opt_d})
        step, best, best_step = meta["step"], meta.get("best"), meta.get("best_step", -1)
        elapsed, window = meta.get("elapsed", 0.0), list(meta.get("window", []))
        if meta.get("sampler") is not None:
            sampler.set_state(meta["sampler"])
        if meta.get("torch_gen") is not None:
            gen.set_state(torch.tensor(meta["torch_gen"], dtype=torch.uint8))
        log.info("%s: resumed at step %d", name, step)
    burn_in = int(round(cfg["burn_in"] * steps))
    win = max(int(cfg["select_window"]), 1)

    def checkpoint() -> None:
        save_checkpoint(ckpt, modules, {"g": opt_g, "d": opt_d},
                        {"step": step, "best": best, "best_step": best_step, "elapsed": elapsed,
                         "window": window, "sampler": sampler.state(), "torch_gen": gen.get_state().tolist()})

    for m in modules.values():
        m.train()
    t0 = time.time() - elapsed
    running = RunningMeans(logf, cfg["log_every"])
    r = float(cfg["sharpen"])
    with InterruptGuard() as guard:
        while step < steps:
            f = linear_decay(step, steps, cfg["decay_start"])
            for opt in (opt_g, opt_d):
                for g in opt.param_groups:
                    g["lr"] = cfg["lr"] * f
            b = sampler.next()
            t, m_real = torch.from_numpy(b["t"]), torch.from_numpy(b["m"])
            t1, t2 = colour_augment(t, gen), colour_augment(t, gen)
            s1 = sharpen(S(t1), r)
            s2 = sharpen(S(t2), r)
            rec = torch.sigmoid(R(s1))
            # S and R: fool both discriminators, reconstruct the tile, agree across colour views
            for p in list(DS.parameters()) + list(DR.parameters()):
                p.requires_grad_(False)
            g_adv_s = lsgan_loss(DS(s1), True)
            g_adv_r = lsgan_loss(DR(rec), True)
            l_rec = (rec - t).abs().mean()
            l_cons = consistency_loss(s1, s2)
            g_loss = w["adv_s"] * g_adv_s + w["adv_r"] * g_adv_r + w["rec"] * l_rec + w["cons"] * l_cons
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            for p in list(DS.parameters()) + list(DR.parameters()):
                p.requires_grad_(True)
            # D_S and D_R: real masks / tiles vs S's masks / reconstructions
            d_s = lsgan_loss(DS(m_real), True) + lsgan_loss(DS(s1.detach()), False)
            d_r = lsgan_loss(DR(t), True) + lsgan_loss(DR(rec.detach()), False)
            d_loss = d_s + d_r
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            step += 1
            elapsed = time.time() - t0
            system = float(d_loss.item() + g_adv_s.item() + g_adv_r.item() + l_rec.item() + l_cons.item())
            if not math.isfinite(system):
                from nucli.errors import ProcessingError

                raise ProcessingError(f"spatialprior training diverged at step {step} (loss {system}); "
                                      "lower the learning rate or resume from the last checkpoint")
            parts = {"system": system, "d_s": d_s.item(), "d_r": d_r.item(), "g_adv_s": g_adv_s.item(),
                     "g_adv_r": g_adv_r.item(), "rec": l_rec.item(), "cons": l_cons.item(),
                     "fg": float(s1.detach().mean())}
            window = (window + [system])[-win:]
            if step >= burn_in and len(window) == win and step % max(win // 5, 1) == 0:
                score = float(np.mean(window))
                if best is None or score < best:
                    best, best_step = score, step
                    save_module(best_path, S, {"step": step, "system": score})
            running.add(name, step, steps, parts, lr=cfg["lr"] * f, elapsed=round(elapsed, 1))
            if progress is not None:
                progress(step, steps)
            guard.checkpoint_if_due(step, steps, cfg["ckpt_every"], checkpoint)
    if not best_path.exists():
        save_module(best_path, S, {"step": step})
        best_step = step
    load_module(best_path, S)
    S.eval()
    return {"name": name, "steps": step, "best_system": best, "best_step": best_step, "burn_in": burn_in,
            "wall_s": round(elapsed, 1)}


# ---------------------------------------------------------------- export and the whole run
def method_config(preset: dict[str, Any], scale: float, preset_name: str, extra: dict[str, Any] | None = None):
    from nucli.models.base import MethodConfig
    from nucli.models.spatialprior import CONFIG

    data = CONFIG.to_dict()
    params = copy.deepcopy(data["params"])
    params.update({"preset": preset_name, "scale": float(scale),
                   "segmentor": {"widths": list(preset["segmentor"]["widths"]),
                                 "norm": preset["segmentor"].get("norm", "instance")}})
    params.update(extra or {})
    data["params"] = params
    return MethodConfig.from_dict(data)


def export_weights(path: Path, segmentor: Any, config: Any, extra: dict[str, str] | None = None) -> Path:
    """S -> one nucli safetensors file (method 'spatialprior', config in its metadata)."""
    from nucli.models.weights_io import save_weights

    tensors = {f"segmentor.{k}": v for k, v in segmentor.state_dict().items()}
    return save_weights(Path(path), tensors, "spatialprior", config.to_dict(), extra)


def train_spatialprior(images_dir: Path, prior_dir: Path, out_dir: Path, preset: str = "cpu",
                       steps: int | None = None, scale: float | str = "auto", resume: bool = False,
                       threads: int | None = None, seed: int = 0, crop: int | None = None,
                       batch: int | None = None, limit: int | None = None,
                       overrides: dict[str, Any] | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Train S (and R, D_S, D_R) on unlabelled ``images_dir`` with the masks of ``prior_dir``; export S.

    Writes ``spatialprior_<preset>.safetensors`` and ``.json`` into ``out_dir``.
    ``overrides`` replace entries of the preset/defaults (e.g. ``{"weights": {...}}``).
    """
    import torch

    if preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    cfg = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(PRESETS[preset])}
    for k, v in (overrides or {}).items():
        cfg[k] = {**cfg[k], **v} if isinstance(cfg.get(k), dict) and isinstance(v, dict) else v
    if steps is not None:
        cfg["steps"] = int(steps)
    if crop is not None:
        cfg["crop"] = int(crop)
    if batch is not None:
        cfg["batch"] = int(batch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images = load_unlabelled(images_dir, limit)
    masks = load_prior_masks(prior_dir)
    scale_file = out_dir / "scale.json"
    if isinstance(scale, str):
        if scale != "auto":
            raise UsageError(f"--scale must be a number or 'auto', not '{scale}'")
        if resume and scale_file.exists():
            scale_info = json.loads(scale_file.read_text())
        else:
            scale_info = estimate_scale(images, masks)
            scale_file.write_text(json.dumps(scale_info))
    else:
        if not 0.1 <= float(scale) <= 10:
            raise UsageError(f"--scale {scale} is out of range (0.1 to 10)")
        scale_info = {"scale": float(scale)}
    log.info("spatialprior: %d images, %d prior masks, scale %.3f", len(images), len(masks), scale_info["scale"])
    nets = build_networks(cfg)
    sampler = UnpairedSampler(images, masks, cfg["crop"], cfg["batch"], scale_info["scale"], cfg["scale_spread"],
                              seed=seed)
    cfg["ckpt_every"] = max(min(cfg["ckpt_every"], cfg["steps"]), 1)
    warm = None
    ws_cfg = cfg.get("warm_start") or {}
    if int(ws_cfg.get("steps", 0)) > 0 and not (resume and (out_dir / "sp.ckpt.safetensors").exists()):
        pairs = PseudoPairSampler(images, pseudo_masks(images), cfg["crop"], cfg["batch"], scale_info["scale"],
                                  cfg["scale_spread"], seed=seed + 3)
        # at most a fifth of the joint steps (a short smoke run stays short)
        warm = warm_start(nets[0], pairs, min(int(ws_cfg["steps"]), max(cfg["steps"] // 5, 1)), float(ws_cfg.get("lr", 1e-3)), out_dir,
                          float(cfg["sharpen"]), seed)
    run = train_joint(nets, sampler, cfg, out_dir, "sp", resume=resume, seed=seed, progress=progress)
    config = method_config(cfg, scale_info["scale"], preset)
    weights = export_weights(out_dir / f"spatialprior_{preset}.safetensors", nets[0], config,
                             {"nucli.selected_step": str(run["best_step"])})
    summary = {
        "weights": str(weights), "images": str(images_dir), "n_images": len(images), "prior_masks": str(prior_dir),
        "n_masks": len(masks), "scale": scale_info, "warm_start": warm, "run": run,
        "training": {k: v for k, v in cfg.items() if k not in ("segmentor",)},
        "config": config.to_dict(), "wall_s": round(time.time() - t0, 1),
    }
    tmp = out_dir / f".spatialprior_{preset}.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=float))
    tmp.replace(out_dir / f"spatialprior_{preset}.json")
    return summary


def write_card(path: Path, summary: dict[str, Any], extra_sections: dict[str, str] | None = None) -> Path:
    """A short model card (markdown) beside the weights, from a training summary."""
    run, cfg = summary.get("run", {}), summary.get("training", {})
    lines = [
        f"# spatialprior ({summary.get('config', {}).get('params', {}).get('preset', '?')} preset)", "",
        f"- unlabelled images: {summary.get('images')} ({summary.get('n_images')} images; no annotation read)",
        f"- prior masks: {summary.get('prior_masks')} ({summary.get('n_masks')} label images, binarised)",
        f"- scale: {json.dumps(summary.get('scale'))}",
        f"- steps: {run.get('steps')} (crop {cfg.get('crop')}, batch {cfg.get('batch')}, lr {cfg.get('lr')}); "
        f"selected step {run.get('best_step')} by the lowest system loss after a burn-in of {run.get('burn_in')} steps",
        f"- loss weights: {json.dumps(cfg.get('weights'))}; sharpening r = {cfg.get('sharpen')}",
        f"- wall time: {summary.get('wall_s')} s", "",
    ]
    for title, text in (extra_sections or {}).items():
        lines += [f"## {title}", "", text.strip(), ""]
    tmp = Path(path).with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return Path(path)


def train_from_options(images: Path | None, prior_masks: Path | None, output: Path, preset: str = "cpu",
                       steps: int | None = None, scale: float | None = None, resume: bool = False,
                       threads: int | None = None, seed: int = 0,
                       progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """``nucli train --method spatialprior``: check the options, train, write weights + summary + card."""
    if images is None or prior_masks is None:
        raise UsageError("--method spatialprior needs --images DIR (unlabelled images of the new stain) and "
                         "--prior-masks DIR (label images of nuclei of any stain)")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, not {steps}")
    cb = (lambda s, n: progress("spatialprior", s, n)) if progress else None
    summary = train_spatialprior(images, prior_masks, output, preset=preset, steps=steps,
                                 scale="auto" if scale is None else float(scale), resume=resume,
                                 threads=threads, seed=seed, progress=cb)
    write_card(Path(output) / f"spatialprior_{preset}.md", summary)
    return summary
