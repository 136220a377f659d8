"""The enhancement (GAN) stage: generator G and discriminator D trained with L1 + lambda * adversarial.

Loss of G: ``|| y - G(x) ||_1 + lambda * BCE(D(G(x)), real)``; loss of D:
``BCE(D(y), real) + BCE(D(G(x)), fake)``. Adam, learning rate constant for the
first half and decaying linearly to 0 over the second half. Checkpoints every
``ckpt_every`` steps (both networks and both optimizers); the generator with
the lowest validation L1 is kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nucli.training.loop import (InterruptGuard, LossLog, RunningMeans, linear_decay, load_checkpoint,
                                 load_module, save_checkpoint, save_module)

log = logging.getLogger("nucli.training")


@dataclass
class GanConfig:
    steps: int
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lam: float = 0.01
    decay_start: float = 0.5
    ckpt_every: int = 100
    val_every: int = 200
    log_every: int = 10


def train_gan(
    gen: Any,
    disc: Any,
    next_batch: Callable[[int], dict[str, Any]],
    val_fn: Callable[[Any], tuple[float, dict[str, float]]] | None,
    cfg: GanConfig,
    out_dir: Path,
    name: str = "gan",
    resume: bool = False,
    sampler: Any = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """Train G and D; returns a summary. Batches hold tensors ``x`` and ``ideal`` (B, 1, H, W).

    ``device`` (None: the CPU): where the steps run, in mixed precision on a GPU
    (:class:`nucli.parallel.device.TrainingDevice`); the networks are returned on the CPU.
    """
    import torch
    import torch.nn.functional as F

    from nucli.parallel.device import TrainingDevice
    from nucli.training.losses import gan_loss

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / f"{name}.ckpt.safetensors"
    best_path = out_dir / f"{name}.best.safetensors"
    logf = LossLog(out_dir / f"{name}.log.jsonl")
    dev = TrainingDevice(device)
    dev.modules(gen, disc)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas)
    step, best, best_step, elapsed = 0, None, -1, 0.0
    if resume and ckpt.exists():
        meta = load_checkpoint(ckpt, {"gen": gen, "disc": disc}, {"g": opt_g, "d": opt_d})
        step, best, best_step, elapsed = meta["step"], meta.get("best"), meta.get("best_step", -1), meta.get("elapsed", 0.0)
        if sampler is not None and meta.get("sampler") is not None:
            sampler.set_state(meta["sampler"])
        log.info("%s: resumed at step %d", name, step)

    def checkpoint() -> None:
        save_checkpoint(ckpt, {"gen": gen, "disc": disc}, {"g": opt_g, "d": opt_d},
                        {"step": step, "best": best, "best_step": best_step, "elapsed": elapsed,
                         "sampler": sampler.state() if sampler is not None else None})

    def validate() -> None:
        nonlocal best, best_step
        if val_fn is None:
            return
        gen.eval()
        with torch.inference_mode(), dev.on_cpu(gen):
            score, extra = val_fn(gen)
        gen.train()
        logf.write(stage=name, step=step, val_l1=score, **extra)
        if best is None or score < best:
            best, best_step = score, step
            save_module(best_path, gen, {"step": step, "val_l1": score})
        log.info("%s step %d: val L1 %.4f (best %.4f at %d)", name, step, score, best, best_step)

    gen.train()
    disc.train()
    t0 = time.time() - elapsed
    running = RunningMeans(logf, cfg.log_every)
    with InterruptGuard() as guard:
        while step < cfg.steps:
            f = linear_decay(step, cfg.steps, cfg.decay_start)
            for opt in (opt_g, opt_d):
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * f
            batch = dev.batch(next_batch(step))
            x, y = batch["x"], batch["ideal"]
            with dev.autocast():
                fake = gen(x)
            # discriminator
            opt_d.zero_grad(set_to_none=True)
            with dev.autocast():
                d_loss = 0.5 * (gan_loss(disc(y), True) + gan_loss(disc(fake.detach()), False))
            dev.step(d_loss, opt_d)
            # generator
            opt_g.zero_grad(set_to_none=True)
            with dev.autocast():
                l1 = F.l1_loss(fake, y)
                adv = gan_loss(disc(fake), True)
                g_loss = l1 + cfg.lam * adv
            dev.step(g_loss, opt_g)
            step += 1
            elapsed = time.time() - t0
            parts = {"l1": l1.item(), "adv": adv.item(), "d": d_loss.item()}
            running.add(name, step, cfg.steps, parts, lr=cfg.lr * f, elapsed=round(elapsed, 1))
            if progress is not None:
                progress(step, cfg.steps, parts)
            if val_fn is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                validate()
            guard.checkpoint_if_due(step, cfg.steps, cfg.ckpt_every, checkpoint)
    if val_fn is None or not best_path.exists():
        save_module(best_path, gen, {"step": step})
        best_step = step
    dev.release(gen, disc)
    load_module(best_path, gen)
    gen.eval()
    return {"name": name, "steps": step, "best_val_l1": best, "best_step": best_step, "wall_s": round(elapsed, 1)}
