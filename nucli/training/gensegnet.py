"""Training GeNSeg-Net: the stages, presets and what is written at the end.

Stages (each checkpointed and resumable, each keeps its best model by val):

1. ``gan``      -- enhancement generator + transformer discriminator on
   (gray image -> ideal-nucleus image) pairs.
2. ``unet``     -- 3-class U-Net trained on ideal images (the stage-1 targets)
   as input, as in the paper; ideal images are lightly degraded (blur, noise,
   gain) so the U-Net tolerates imperfect enhanced images.
3. ``finetune`` -- optional: the same U-Net fine-tuned on the frozen
   generator's outputs (kept only if it is better on val).
4. ``raw``      -- ablation only: a U-Net of the same size trained on the raw
   gray images (no enhancement).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger("nucli.training")

PRESETS: dict[str, dict[str, Any]] = {
    # the paper's widths and schedule (GPU-sized)
    "paper": {
        "generator": {"channels": 64, "n_down": 2, "n_blocks": 9, "max_channels": 256, "input_skip": False},
        "discriminator": {"dim": 384, "patch": 8, "base_size": 256, "heads": 4, "window": 8},
        "unet": {"widths": [64, 128, 256, 512, 1024]},
        "crop": 256, "batch": 2, "epochs": 400,
        "gan": {"lr": 1e-4, "lam": 0.01},
        "unet_train": {"lr": 1e-4, "epochs": 200},
        "finetune": {"lr": 2e-5, "epochs": 20},
    },
    # narrow and short enough to train in about an hour on 2 CPU cores
    "cpu": {
        "generator": {"channels": 16, "n_down": 2, "n_blocks": 9, "max_channels": 48, "input_skip": True},
        "discriminator": {"dim": 128, "patch": 8, "base_size": 256, "heads": 4, "window": 8},
        "unet": {"widths": [16, 32, 64, 128]},
        "crop": 256, "batch": 6, "epochs": 17,
        "gan": {"lr": 4e-4, "lam": 0.01},
        "unet_train": {"lr": 1e-3, "epochs": 10},
        "finetune": {"lr": 2e-4, "epochs": 3},
    },
}


def steps_for(epochs: float, n_images: int, batch: int) -> int:
    """One epoch = one random crop per training image."""
    return max(int(round(epochs * n_images / batch)), 1)


def build_networks(preset: dict[str, Any]):
    from nucli.models.gensegnet.discriminator import Discriminator
    from nucli.models.gensegnet.generator import Generator
    from nucli.models.gensegnet.unet import UNet

    gen = Generator(**preset["generator"])
    disc = Discriminator(**preset["discriminator"])
    unet = UNet(tuple(preset["unet"]["widths"]))
    return gen, disc, unet


def _torch_batch(b: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(v) for k, v in b.items()}


def _macro_dice(pred: np.ndarray, target: np.ndarray, k: int = 3) -> float:
    ds = []
    for c in range(k):
        p, t = pred == c, target == c
        s = p.sum() + t.sum()
        if s:
            ds.append(2.0 * (p & t).sum() / s)
    return float(np.mean(ds)) if ds else 1.0


def _run_padded(net: Any, x: np.ndarray, stride: int):
    import torch

    from nucli.models.gensegnet.generator import pad_to

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    t, (h, w) = pad_to(t, stride)
    return net(t)[..., :h, :w]


def gan_val_fn(val, stride: int) -> Callable:
    def fn(gen) -> tuple[float, dict[str, float]]:
        errs = [float(np.abs(_run_padded(gen, s.x, stride)[0, 0].numpy() - s.ideal.astype(np.float32)).mean())
                for s in val]
        return float(np.mean(errs)), {}
    return fn


def unet_val_fn(val, stride: int, inputs: Callable[[Any], np.ndarray]) -> Callable:
    def fn(unet) -> tuple[float, dict[str, float]]:
        ds = [_macro_dice(_run_padded(unet, inputs(s), stride)[0].argmax(0).numpy(), s.cls) for s in val]
        return float(np.mean(ds)), {}
    return fn


def generator_outputs(gen, samples, stride: int) -> list[np.ndarray]:
    import torch

    gen.eval()
    with torch.inference_mode():
        return [_run_padded(gen, s.x, stride)[0, 0].numpy().astype(np.float16) for s in samples]


def run_stage(stage: str, train_dir: Path, val_dir: Path | None, out_dir: Path, preset_name: str = "cpu",
              epochs: float | None = None, resume: bool = False, seed: int = 0, limit: int | None = None,
              progress: Callable | None = None, crop: int | None = None, batch: int | None = None,
              val_limit: int | None = None) -> dict[str, Any]:
    """Run one training stage; its outputs land in ``out_dir``."""
    import torch

    from nucli.training.data import CropSampler, degrade, load_dataset, val_crops
    from nucli.training.gan import GanConfig, train_gan
    from nucli.training.loop import LoopConfig, load_module, train_supervised
    from nucli.training.losses import ce_dice_loss

    torch.manual_seed(seed)
    preset = copy.deepcopy(PRESETS[preset_name])
    crop = crop or preset["crop"]
    batch = batch or preset["batch"]
    out_dir = Path(out_dir)
    cache = out_dir / "cache"
    train = load_dataset(train_dir, cache, limit=limit)
    val = val_crops(load_dataset(val_dir, cache, limit=val_limit), 256) if val_dir else None
    gen, disc, unet = build_networks(preset)
    rng = np.random.default_rng(seed + 1)

    if stage == "gan":
        ep = epochs if epochs is not None else preset["epochs"]
        steps = steps_for(ep, len(train), batch)
        sampler = CropSampler(train, crop, batch, seed=seed)
        cfg = GanConfig(steps=steps, lr=preset["gan"]["lr"], lam=preset["gan"]["lam"],
                        ckpt_every=max(min(50, steps), 1), val_every=max(min(100, steps), 1))
        return train_gan(gen, disc, lambda i: _torch_batch(sampler.next()),
                         gan_val_fn(val, gen.stride) if val else None, cfg, out_dir, "gan", resume, sampler, progress)

    if stage in ("unet", "raw", "finetune"):
        uc = preset["finetune"] if stage == "finetune" else preset["unet_train"]
        ep = uc["epochs"] if epochs is None else epochs
        steps = steps_for(ep, len(train), batch)
        sampler = CropSampler(train, crop, batch, seed=seed + {"unet": 10, "raw": 20, "finetune": 30}[stage])
        if stage == "unet":
            def next_batch(i):
                b = sampler.next()
                return _torch_batch({"x": degrade(b["ideal"], rng), "cls": b["cls"]})
            val_in = lambda s: s.ideal.astype(np.float32)  # noqa: E731
        elif stage == "raw":
            def next_batch(i):
                b = sampler.next()
                return _torch_batch({"x": b["x"], "cls": b["cls"]})
            val_in = lambda s: s.x.astype(np.float32)  # noqa: E731
        else:
            load_module(out_dir / "gan.best.safetensors", gen)
            load_module(out_dir / "unet.best.safetensors", unet)
            gen.eval()
            for p in gen.parameters():
                p.requires_grad_(False)

            def next_batch(i):
                b = _torch_batch(sampler.next())
                with torch.inference_mode():
                    e = gen(b["x"])
                return {"x": e.clone(), "cls": b["cls"]}
            vouts = {s.name: o for s, o in zip(val, generator_outputs(gen, val, gen.stride))} if val else {}
            val_in = lambda s: vouts[s.name].astype(np.float32)  # noqa: E731
        cfg = LoopConfig(steps=steps, lr=uc["lr"], ckpt_every=max(min(50, steps), 1),
                         val_every=max(min(100, steps), 1))
        loss_fn = lambda m, b: ce_dice_loss(m(b["x"]), b["cls"], 1.0, 3.0)  # noqa: E731
        vf = unet_val_fn(val, unet.stride, val_in) if val else None
        return train_supervised(unet, next_batch, loss_fn, vf, cfg, out_dir, stage, resume, sampler, progress)
    raise ValueError(f"unknown stage {stage}")
