"""Task-adversarial training with synthetic images (Algorithm 1 of Gong et al.), and its ablation.

The segmenter S is the GeNSeg-Net segmentation U-Net used alone (3-class map,
gray input: :mod:`nucli.models.gensegnet.preprocess`), so the result is a
``gensegnet`` weights file without the enhancement generator, usable with
``--method gensegnet --weights``. Stages, each checkpointed and resumable:

1. ``pool``  -- pre-synthesised images ``ID(x)`` with their deformed labels
   (:func:`nucli.synth.compose.pre_synthesize`), cached in ``synth_pool.npz``;
2. ``ae``    -- the refiner's encoder and decoder as an autoencoder on real crops;
3. ``gd``    -- encoder frozen; decoder G and image discriminator D pre-trained
   with ``L_global = L_img_adv + lambda * L_g`` (content + style, Eq. 4);
4. ``joint`` -- per step: G descends ``L_adv(D) + lambda * L_g - beta * L_s(S(G(c, s)), y~)``
   (it *increases* the segmentation loss of its images: task-adversarial),
   D descends its real/fake loss, and S descends ``L_s(S(x), y) + L_s(S(G(c, s)), y~)``.

The ablation ``synth=False`` runs only S on the real batches (stage ``real``),
with the same sampler, steps, learning-rate schedule and network.
L_s is the GeNSeg-Net segmentation loss (CE + 3 * soft Dice); GAN losses are
binary cross-entropy (the paper's log loss). ``beta`` (0.1) scales the
task-adversarial term so that it does not overpower the content/style
losses of this small encoder; S is trained from scratch in both arms (the
paper pre-trains it on the real images first).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nucli.errors import UsageError

log = logging.getLogger("nucli.synth")

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "unet": {"widths": [16, 32, 64, 128]},
        "refiner": {"channels": 16},
        "discriminator": {"channels": 16, "layers": 3},
        "crop": 96, "batch": 4, "steps": 500, "lr": 1e-3,
        "ae_steps": 200, "pre_steps": 200, "g_lr": 2e-4, "pool": 60,
        "gamma": 0.5, "lam": 100.0, "beta": 0.1,
    },
    "paper": {
        "unet": {"widths": [64, 128, 256, 512, 1024]},
        "refiner": {"channels": 64},
        "discriminator": {"channels": 64, "layers": 3},
        "crop": 256, "batch": 2, "steps": 20000, "lr": 1e-4,
        "ae_steps": 5000, "pre_steps": 5000, "g_lr": 1e-5, "pool": 2000,
        "gamma": 0.5, "lam": 10.0, "beta": 0.1,
    },
}
_LUMA = (0.299, 0.587, 0.114)


# ---------------------------------------------------------------- data
@dataclass
class PoolItem:
    content: np.ndarray  # (H, W, 3) uint8 pre-synthesised image
    labels: np.ndarray  # (H, W) int32 deformed labels
    cls: np.ndarray  # (H, W) uint8 3-class target of the labels
    invert: bool  # brightfield: the segmenter sees the inverted gray image
    kind: str  # 'hed', 'dark' or 'bright' (style images are drawn from the same kind)


def load_rgb_pairs(data_dir: Path, limit: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB uint8, labels int32) of DIR/images + DIR/labels."""
    from nucli.postprocess import as_rgb
    from nucli.training.data import list_pairs, read_pair

    out = []
    for ip, lp in list_pairs(Path(data_dir))[:limit]:
        img, lab = read_pair(ip, lp)
        img = as_rgb(img)
        if img.dtype != np.uint8:
            img = np.clip(img.astype(np.float32) * (255.0 / max(float(img.max()), 1.0)), 0, 255).astype(np.uint8)
        out.append((ip.stem, img, lab))
    return out


def _invert(rgb: np.ndarray) -> bool:
    from nucli.models.gensegnet.preprocess import is_brightfield, to_gray

    return is_brightfield(to_gray(rgb))


def build_pool(pairs: list[tuple[str, np.ndarray, np.ndarray]], size: int, seed: int, cache: Path | None = None,
               progress: Callable[[int, int], None] | None = None) -> list[PoolItem]:
    """``size`` pre-synthesised images from random sources (cached as one .npz)."""
    from nucli.synth.compose import image_kind, pre_synthesize
    from nucli.training.targets import class_map

    if cache is not None and Path(cache).exists():
        z = np.load(cache, allow_pickle=False)
        n = int(z["n"])
        if n == size:
            return [PoolItem(z[f"c{i}"], z[f"l{i}"], z[f"y{i}"], bool(z["inv"][i]), str(z["kind"][i]))
                    for i in range(n)]
    rng = np.random.default_rng(seed)
    items = []
    for i in range(size):
        _, img, lab = pairs[int(rng.integers(len(pairs)))]
        content, new = pre_synthesize(img, lab, np.random.default_rng([seed, i]))
        items.append(PoolItem(content, new, class_map(new), _invert(img), image_kind(img)))
        if progress is not None:
            progress(i + 1, size)
    if cache is not None:
        arrays: dict[str, Any] = {"n": np.array(size), "inv": np.array([it.invert for it in items]),
                                  "kind": np.array([it.kind for it in items])}
        for i, it in enumerate(items):
            arrays.update({f"c{i}": it.content, f"l{i}": it.labels, f"y{i}": it.cls})
        tmp = Path(cache).with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(cache)
    return items


def _crop(rng: np.random.Generator, arrays: list[np.ndarray], s: int) -> list[np.ndarray]:
    h, w = arrays[0].shape[:2]
    out = []
    if h < s or w < s:
        pads = [((0, max(s - h, 0)), (0, max(s - w, 0))) + (((0, 0),) if a.ndim == 3 else ()) for a in arrays]
        arrays = [np.pad(a, p, mode="reflect" if a.ndim == 3 else "constant") for a, p in zip(arrays, pads)]
        h, w = arrays[0].shape[:2]
    y0, x0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    for a in arrays:
        a = np.rot90(a[y0:y0 + s, x0:x0 + s], k)
        out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
    return out


class SynthSampler:
    """Batches of (content crop, style crop of a real image of the same kind, 3-class target, invert flag)."""

    def __init__(self, pool: list[PoolItem], reals: list[np.ndarray], crop: int, batch: int, seed: int = 0):
        from nucli.synth.compose import image_kind

        self.pool, self.reals, self.crop, self.batch = pool, reals, int(crop), int(batch)
        self.by_kind: dict[str, list[int]] = {}
        for i, r in enumerate(reals):
            self.by_kind.setdefault(image_kind(r), []).append(i)
        self.rng = np.random.default_rng(seed)

    def real_crops(self, n: int) -> np.ndarray:
        out = [_crop(self.rng, [self.reals[int(self.rng.integers(len(self.reals)))]], self.crop)[0] for _ in range(n)]
        return np.stack(out).transpose(0, 3, 1, 2).astype(np.float32) / 255.0

    def next(self) -> dict[str, np.ndarray]:
        cs, ss, ys, inv = [], [], [], []
        for _ in range(self.batch):
            it = self.pool[int(self.rng.integers(len(self.pool)))]
            c, y = _crop(self.rng, [it.content, it.cls], self.crop)
            same = self.by_kind.get(it.kind) or list(range(len(self.reals)))
            s = _crop(self.rng, [self.reals[same[int(self.rng.integers(len(same)))]]], self.crop)[0]
            cs.append(c)
            ss.append(s)
            ys.append(y)
            inv.append(it.invert)
        f = lambda a: np.stack(a).transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # noqa: E731
        return {"content": f(cs), "style": f(ss), "cls": np.stack(ys).astype(np.int64), "invert": np.array(inv)}

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def segmenter_input(rgb, invert):
    """Differentiable twin of :func:`nucli.models.gensegnet.preprocess.normalize` for (B, 3, H, W) in [0, 1].

    Luminance, inverted where ``invert`` (brightfield), stretched between the
    1st and 99.8th percentile (range at least 16/255). Returns (B, 1, H, W).
    """
    import torch

    from nucli.models.gensegnet.preprocess import HIGH_PCT, LOW_PCT, MIN_RANGE

    luma = torch.tensor(_LUMA, dtype=rgb.dtype).view(1, 3, 1, 1)
    gray = (rgb * luma).sum(1, keepdim=True) * 255.0
    inv = torch.as_tensor(invert, dtype=torch.bool).view(-1, 1, 1, 1)
    gray = torch.where(inv, 255.0 - gray, gray)
    flat = gray.flatten(1)
    lo = torch.quantile(flat, LOW_PCT / 100.0, dim=1).view(-1, 1, 1, 1)
    hi = torch.quantile(flat, HIGH_PCT / 100.0, dim=1).view(-1, 1, 1, 1)
    hi = torch.maximum(hi, lo + MIN_RANGE)
    return ((gray - lo) / (hi - lo)).clamp(0.0, 1.0)


# ---------------------------------------------------------------- a small multi-network loop
def _multi_loop(name: str, step_fn: Callable[[int], dict[str, float]], modules: dict[str, Any],
                optimizers: dict[str, Any], base_lrs: dict[str, float], steps: int, out_dir: Path,
                resume: bool, samplers: dict[str, Any], decay_start: float = 0.5, ckpt_every: int = 100,
                log_every: int = 10, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run ``step_fn`` ``steps`` times with checkpoints of all modules/optimizers/samplers and a loss log."""
    from nucli.training.loop import (InterruptGuard, LossLog, RunningMeans, linear_decay, load_checkpoint,
                                     save_checkpoint)

    ckpt = Path(out_dir) / f"{name}.ckpt.safetensors"
    logf = LossLog(Path(out_dir) / f"{name}.log.jsonl")
    step, elapsed = 0, 0.0
    if resume and ckpt.exists():
        meta = load_checkpoint(ckpt, modules, optimizers)
        step, elapsed = meta["step"], meta.get("elapsed", 0.0)
        for k, s in samplers.items():
            if meta.get("samplers", {}).get(k) is not None:
                s.set_state(meta["samplers"][k])
        log.info("%s: resumed at step %d", name, step)
    t0 = time.time() - elapsed
    running = RunningMeans(logf, log_every)

    def checkpoint() -> None:
        save_checkpoint(ckpt, modules, optimizers,
                        {"step": step, "elapsed": elapsed, "samplers": {k: s.state() for k, s in samplers.items()}})
    ckpt_every = max(min(ckpt_every, steps), 1)
    with InterruptGuard() as guard:
        while step < steps:
            f = linear_decay(step, steps, decay_start)
            for k, opt in optimizers.items():
                for g in opt.param_groups:
                    g["lr"] = base_lrs[k] * f
            parts = step_fn(step)
            step += 1
            elapsed = time.time() - t0
            running.add(name, step, steps, parts, elapsed=round(elapsed, 1))
            if progress is not None:
                progress(step, steps)
            guard.checkpoint_if_due(step, steps, ckpt_every, checkpoint)
    return {"name": name, "steps": step, "wall_s": round(elapsed, 1)}


def _set_grad(modules, flag: bool) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)


# ---------------------------------------------------------------- the run
def export_segmenter(path: Path, unet: Any, widths: list[int], stage: str) -> Path:
    """The U-Net as a ``gensegnet`` weights file without enhancement (``--method gensegnet --weights``)."""
    from nucli.models.gensegnet.generator import PassThrough
    from nucli.training.gensegnet import export_weights, method_config

    cfg = method_config("cpu", extra={"generator": None, "unet": {"widths": list(widths)},
                                      "segmentation_stage": stage})
    return export_weights(Path(path), PassThrough(), unet, cfg)


def export_refiner(path: Path, refiner: Any, channels: int) -> Path:
    from nucli.models.weights_io import save_weights

    return save_weights(Path(path), dict(refiner.state_dict()), "synth-refiner", {"channels": int(channels)})


def load_refiner(path: Path):
    """A trained :class:`~nucli.synth.adain.StyleRefiner` from ``export_refiner``'s file (clear errors)."""
    from nucli.models.weights_io import load_into, load_weights
    from nucli.synth.adain import StyleRefiner

    tensors, cfg = load_weights(Path(path), "synth-refiner")
    ref = StyleRefiner(int(cfg.get("channels", 16)))
    load_into(ref, tensors, path, "synth-refiner")
    return ref.eval()


def train_with_synthesis(train_dir: Path, out_dir: Path, synth: bool = True, preset: str = "cpu",
                         steps: int | None = None, resume: bool = False, threads: int | None = None,
                         seed: int = 0, limit: int | None = None, overrides: dict[str, Any] | None = None,
                         progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Train the segmentation U-Net on ``train_dir`` with (``synth``) or without style-consistent synthesis.

    Writes ``gensegnet_synth.safetensors`` (or ``gensegnet_real.safetensors``),
    ``synth_refiner.safetensors`` (with synthesis) and a ``.json`` summary into ``out_dir``.
    """
    import torch

    from nucli.models.gensegnet.unet import UNet
    from nucli.training.data import CropSampler, load_dataset
    from nucli.training.loop import LoopConfig, load_module, train_supervised
    from nucli.training.losses import ce_dice_loss, gan_loss

    if preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    cfg.update(copy.deepcopy(overrides or {}))
    if steps is not None:
        cfg["steps"] = int(steps)
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    cb = (lambda stage: (lambda s, n: progress(stage, s, n))) if progress else (lambda stage: None)
    samples = load_dataset(train_dir, out_dir / "cache", limit=limit)
    widths = list(cfg["unet"]["widths"])
    unet = UNet(tuple(widths))
    real = CropSampler(samples, cfg["crop"], cfg["batch"], seed=seed + 10)

    def real_batch():
        b = real.next()
        return torch.from_numpy(b["x"]), torch.from_numpy(b["cls"])

    stages: dict[str, Any] = {}
    if not synth:
        lc = LoopConfig(steps=cfg["steps"], lr=cfg["lr"], ckpt_every=min(100, cfg["steps"]), val_every=10 ** 9)
        stages["real"] = train_supervised(unet, lambda i: real_batch(), lambda m, b: ce_dice_loss(m(b[0]), b[1]),
                                          None, lc, out_dir, "real", resume, real, cb("real"))
        weights = export_segmenter(out_dir / "gensegnet_real.safetensors", unet, widths, "real")
    else:
        from nucli.synth.adain import StyleRefiner, generation_loss
        from nucli.training.spatialprior import PatchDiscriminator

        pairs = load_rgb_pairs(train_dir, limit)
        pool = build_pool(pairs, int(cfg["pool"]), seed, out_dir / "synth_pool.npz", cb("pool"))
        sampler = SynthSampler(pool, [p[1] for p in pairs], cfg["crop"], cfg["batch"], seed=seed + 20)
        refiner = StyleRefiner(int(cfg["refiner"]["channels"]))
        disc = PatchDiscriminator(3, cfg["discriminator"]["channels"], cfg["discriminator"]["layers"])

        # 2. encoder (+ decoder) as an autoencoder on real crops
        ae_cfg = LoopConfig(steps=int(cfg["ae_steps"]), lr=1e-3, ckpt_every=100, val_every=10 ** 9)
        stages["ae"] = train_supervised(
            refiner, lambda i: torch.from_numpy(sampler.real_crops(cfg["batch"])),
            lambda m, x: ((m.reconstruct(x) - x).abs().mean(), {}), None, ae_cfg, out_dir, "ae", resume,
            sampler, cb("ae"))
        load_module(out_dir / "ae.best.safetensors", refiner)
        _set_grad([refiner.encoder], False)
        refiner.encoder.eval()
        opt_g = torch.optim.Adam(refiner.decoder.parameters(), lr=cfg["g_lr"], betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg["g_lr"], betas=(0.5, 0.999))
        lam, gamma, beta = float(cfg["lam"]), float(cfg["gamma"]), float(cfg["beta"])

        def g_d_step(with_task: bool) -> dict[str, float]:
            b = sampler.next()
            c, st = torch.from_numpy(b["content"]), torch.from_numpy(b["style"])
            y = torch.from_numpy(b["cls"])
            out, targets = refiner.stylise(c, st)
            lg, parts = generation_loss(refiner, out, targets, st, gamma)
            _set_grad([disc], False)
            adv = gan_loss(disc(out), True)
            g_loss = adv + lam * lg
            if with_task:
                _set_grad([unet], False)
                ls_syn_g, _ = ce_dice_loss(unet(segmenter_input(out, b["invert"])), y)
                g_loss = g_loss - beta * ls_syn_g
                _set_grad([unet], True)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            _set_grad([disc], True)
            d_loss = 0.5 * (gan_loss(disc(st), True) + gan_loss(disc(out.detach()), False))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            parts.update({"g_adv": adv.item(), "d": d_loss.item(), "l_g": lg.item()})
            if with_task:
                parts["task_g"] = ls_syn_g.item()
                # S learns from real + the (detached) synthetic batch
                x_real, y_real = real_batch()
                l_real, _ = ce_dice_loss(unet(x_real), y_real)
                l_syn, _ = ce_dice_loss(unet(segmenter_input(out.detach(), b["invert"])), y)
                s_loss = l_real + l_syn
                opt_s.zero_grad(set_to_none=True)
                s_loss.backward()
                opt_s.step()
                parts.update({"loss": s_loss.item(), "s_real": l_real.item(), "s_syn": l_syn.item()})
            return parts

        # 3. G and D pre-trained with L_global (no segmenter yet)
        refiner.decoder.train()
        stages["gd"] = _multi_loop("gd", lambda i: g_d_step(False), {"refiner": refiner, "disc": disc},
                                   {"g": opt_g, "d": opt_d}, {"g": cfg["g_lr"], "d": cfg["g_lr"]},
                                   int(cfg["pre_steps"]), out_dir, resume, {"synth": sampler}, decay_start=1.0,
                                   progress=cb("gd"))
        # 4. joint task-adversarial training (Algorithm 1)
        opt_s = torch.optim.Adam(unet.parameters(), lr=cfg["lr"])
        unet.train()
        stages["joint"] = _multi_loop(
            "joint", lambda i: g_d_step(True), {"refiner": refiner, "disc": disc, "unet": unet},
            {"g": opt_g, "d": opt_d, "s": opt_s}, {"g": cfg["g_lr"], "d": cfg["g_lr"], "s": cfg["lr"]},
            int(cfg["steps"]), out_dir, resume, {"synth": sampler, "real": real}, progress=cb("joint"))
        unet.eval()
        weights = export_segmenter(out_dir / "gensegnet_synth.safetensors", unet, widths, "synth-style")
        export_refiner(out_dir / "synth_refiner.safetensors", refiner, int(cfg["refiner"]["channels"]))
    summary = {"weights": str(weights), "synth": bool(synth), "data": str(train_dir), "n_images": len(samples),
               "training": cfg, "stages": stages, "wall_s": round(time.time() - t_start, 1)}
    name = "gensegnet_synth" if synth else "gensegnet_real"
    tmp = out_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=float))
    tmp.replace(out_dir / f"{name}.json")
    return summary
