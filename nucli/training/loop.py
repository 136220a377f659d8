"""A generic supervised training loop with checkpoints, resume, loss logs and val-based selection.

Used by every trainable method: give it a model, a batch source, a loss and a
validation score. Checkpoints are safetensors files (model + optimizer tensors)
with a JSON sidecar (step, best score, sampler state, optimizer hyper-parameters),
written atomically every ``ckpt_every`` steps; ``resume=True`` continues from
the last one. The best model by validation score is kept separately.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("nucli.training")


class InterruptGuard:
    """Defers the first Ctrl-C until the current training step is complete.

    Inside ``with InterruptGuard() as guard:`` a first SIGINT only sets
    ``guard.requested``; the loop checks it after each step, writes a
    checkpoint and calls :meth:`stop` (which raises ``KeyboardInterrupt``), so
    an interrupted run loses no finished step. A second Ctrl-C interrupts at
    once, as usual. Outside the main thread (or when SIGINT is not Python's
    default handler, e.g. ignored) nothing is changed.
    """

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> "InterruptGuard":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.default_int_handler

            def handler(signum, frame):
                if self.requested:
                    raise KeyboardInterrupt
                self.requested = True
                log.warning("interrupt: finishing the current step and writing a checkpoint "
                            "(Ctrl-C again to stop at once)")

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def stop(self) -> None:
        raise KeyboardInterrupt

    def checkpoint_if_due(self, step: int, total: int, every: int, save: Callable[[], None]) -> None:
        """After a finished step: ``save()`` every ``every`` steps, at the last one and on a
        pending Ctrl-C (then stop with ``KeyboardInterrupt``)."""
        if step % every == 0 or step == total or self.requested:
            save()
        if self.requested:
            self.stop()


class RunningMeans:
    """Per-step loss parts, averaged and written to a :class:`LossLog` every ``every`` steps (and at the last)."""

    def __init__(self, logf: "LossLog", every: int):
        self.logf, self.every, self.sums = logf, int(every), {}

    def add(self, stage: str, step: int, total: int, parts: dict[str, float], **fields: Any) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if step % self.every == 0 or step == total:
            n = self.every if step % self.every == 0 else step % self.every
            self.logf.write(stage=stage, step=step, **fields, **{k: v / n for k, v in self.sums.items()})
            self.sums = {}


@dataclass
class LoopConfig:
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    decay_start: float = 0.5  # fraction of steps after which lr decays linearly to 0
    ckpt_every: int = 100
    val_every: int = 200
    log_every: int = 10
    higher_is_better: bool = True
    stop_at: int | None = None  # stop early at this step, keeping the schedule of ``steps`` (ablations)
    extra: dict[str, Any] = field(default_factory=dict)


def linear_decay(step: int, total: int, start: float) -> float:
    """Learning-rate factor: 1 until ``start * total``, then linear to 0 at ``total``."""
    s0 = int(total * start)
    if step < s0 or total <= s0:
        return 1.0
    return max(0.0, 1.0 - (step - s0) / max(total - s0, 1))


# ---------------------------------------------------------------- checkpoint helpers
def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def save_checkpoint(path: Path, modules: dict[str, Any], optimizers: dict[str, Any], meta: dict[str, Any]) -> None:
    """Modules' state dicts + optimizers' tensors -> ``path`` (.safetensors) + ``path``.json."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            tensors[f"model.{name}.{k}"] = v.detach().cpu().contiguous()
    opt_meta = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        scalars = {}
        for idx, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{name}.{idx}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
                else:
                    scalars[f"{idx}.{k}"] = v
        opt_meta[name] = {"param_groups": sd["param_groups"], "scalars": scalars}
    # step tensors may be 0-d; safetensors handles them
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _atomic_write_text(path.with_suffix(".json"), json.dumps({"meta": meta, "optimizers": opt_meta}, default=str))


def load_checkpoint(path: Path, modules: dict[str, Any], optimizers: dict[str, Any]) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the meta dict."""
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path))
    side = json.loads(path.with_suffix(".json").read_text())
    for name, mod in modules.items():
        pre = f"model.{name}."
        mod.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, strict=True)
    for name, opt in optimizers.items():
        info = side["optimizers"][name]
        state: dict[int, dict[str, Any]] = {}
        pre = f"opt.{name}."
        for k, v in tensors.items():
            if k.startswith(pre):
                idx, key = k[len(pre):].split(".", 1)
                state.setdefault(int(idx), {})[key] = v
        for k, v in info["scalars"].items():
            idx, key = k.split(".", 1)
            state.setdefault(int(idx), {})[key] = v
        opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return side["meta"]


def save_module(path: Path, module: Any, meta: dict[str, Any] | None = None) -> None:
    """Plain state-dict snapshot (safetensors) of one module, e.g. the best model so far."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, tmp,
                  metadata={k: str(v) for k, v in (meta or {}).items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_module(path: Path, module: Any) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)), strict=True)


class LossLog:
    """Append-only JSON-lines log of losses and validation scores."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 1))
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")


# ---------------------------------------------------------------- the loop
def train_supervised(
    model: Any,
    next_batch: Callable[[int], Any],
    loss_fn: Callable[[Any, Any], tuple[Any, dict[str, float]]],
    val_fn: Callable[[Any], tuple[float, dict[str, float]]] | None,
    cfg: LoopConfig,
    out_dir: Path,
    name: str,
    resume: bool = False,
    sampler: Any = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.steps`` steps; returns a summary (best score, step, wall time).

    ``device`` (None: the CPU): where the steps run, in mixed precision on a GPU
    (:class:`nucli.parallel.device.TrainingDevice`); the model is returned on the CPU.

    Files in ``out_dir``: ``{name}.ckpt.safetensors`` (+ .json), ``{name}.best.safetensors``,
    ``{name}.log.jsonl``. ``sampler`` (optional) has ``state()``/``set_state()`` so a resumed
    run continues the same random stream.
    """
    import torch

    from nucli.parallel.device import TrainingDevice

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / f"{name}.ckpt.safetensors"
    best_path = out_dir / f"{name}.best.safetensors"
    logf = LossLog(out_dir / f"{name}.log.jsonl")
    dev = TrainingDevice(device)
    dev.modules(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    step, best, best_step, elapsed = 0, None, -1, 0.0
    if resume and ckpt.exists():
        meta = load_checkpoint(ckpt, {"model": model}, {"opt": opt})
        step, best, best_step, elapsed = meta["step"], meta.get("best"), meta.get("best_step", -1), meta.get("elapsed", 0.0)
        if sampler is not None and meta.get("sampler") is not None:
            sampler.set_state(meta["sampler"])
        log.info("%s: resumed at step %d", name, step)

    def checkpoint() -> None:
        save_checkpoint(ckpt, {"model": model}, {"opt": opt},
                        {"step": step, "best": best, "best_step": best_step, "elapsed": elapsed,
                         "sampler": sampler.state() if sampler is not None else None})

    def validate() -> None:
        nonlocal best, best_step
        if val_fn is None:
            return
        model.eval()
        with torch.inference_mode(), dev.on_cpu(model):
            score, extra = val_fn(model)
        model.train()
        better = best is None or (score > best if cfg.higher_is_better else score < best)
        logf.write(stage=name, step=step, val=score, **extra)
        if better:
            best, best_step = score, step
            save_module(best_path, model, {"step": step, "score": score})
        log.info("%s step %d: val %.4f (best %.4f at %d)", name, step, score, best, best_step)

    model.train()
    t0 = time.time() - elapsed
    running = RunningMeans(logf, cfg.log_every)
    with InterruptGuard() as guard:
        last = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
        while step < last:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * linear_decay(step, cfg.steps, cfg.decay_start)
            batch = dev.batch(next_batch(step))
            with dev.autocast():
                loss, parts = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            dev.step(loss, opt)
            step += 1
            elapsed = time.time() - t0
            parts = {"loss": loss.item(), **parts}
            running.add(name, step, cfg.steps, parts, lr=opt.param_groups[0]["lr"], elapsed=round(elapsed, 1))
            if progress is not None:
                progress(step, cfg.steps, parts)
            if val_fn is not None and (step % cfg.val_every == 0 or step == last):
                validate()
            guard.checkpoint_if_due(step, last, cfg.ckpt_every, checkpoint)
    if val_fn is None or not best_path.exists():
        save_module(best_path, model, {"step": step})
        best_step = step
    dev.release(model)
    load_module(best_path, model)
    model.eval()
    return {"name": name, "steps": step, "best": best, "best_step": best_step, "wall_s": round(elapsed, 1),
            "finite": math.isfinite(float(best)) if best is not None else True}
