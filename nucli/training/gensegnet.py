"""Training GeNSeg-Net: the stages, presets and what is written at the end.

Stages (each checkpointed and resumable, each keeps its best model by val):

1. ``gan``      -- enhancement generator + transformer discriminator on
   (gray image -> ideal-nucleus image) pairs.
1b. ``gan2``    -- ``cpu-long`` preset only: a second GAN phase at the paper's learning
   rate (1e-4), starting from the first phase's networks; later stages use its
   generator.
2. ``unet``     -- 3-class U-Net trained on ideal images (the stage-1 targets)
   as input, as in the paper; ideal images are lightly degraded (blur, noise,
   gain) so the U-Net tolerates imperfect enhanced images.
3. ``finetune`` -- optional: the same U-Net fine-tuned on the frozen
   generator's outputs (kept only if it is better on val).
4. ``raw``      -- ablation only: a U-Net of the same size trained on the raw
   gray images (no enhancement); ``rawft`` continues it with ``finetune``'s
   schedule, so the ablation gets as many U-Net updates as the full model.
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
        "gan_refine": None,
    },
    # narrow and short enough to train in about an hour on 2 CPU cores
    "cpu": {
        "generator": {"channels": 16, "n_down": 2, "n_blocks": 9, "max_channels": 48, "input_skip": True},
        "discriminator": {"dim": 128, "patch": 8, "base_size": 256, "heads": 4, "window": 8},
        "unet": {"widths": [16, 32, 64, 128]},
        "crop": 256, "batch": 6, "epochs": 9.375,
        "gan": {"lr": 4e-4, "lam": 0.01},
        "unet_train": {"lr": 1e-3, "epochs": 4},
        "finetune": {"lr": 2e-4, "epochs": 2},
        "gan_refine": None,
    },
}
# the shipped cpu schedule, then a second GAN phase at the paper's learning rate (from the first
# phase's networks) and a fine-tune of 1,500 steps: about 1.6 h more on 2 cores (see the model card)
PRESETS["cpu-long"] = {**copy.deepcopy(PRESETS["cpu"]),
                       "finetune": {"lr": 2e-4, "epochs": 21.63},
                       "gan_refine": {"lr": 1e-4, "epochs": 21.63}}


def steps_for(epochs: float, n_images: int, batch: int) -> int:
    """One epoch = one random crop per training image."""
    return max(int(round(epochs * n_images / batch)), 1)


def generator_file(out_dir: Path) -> Path:
    """The generator the later stages use: the refined one when that phase ran."""
    refined = Path(out_dir) / "gan2.best.safetensors"
    return refined if refined.exists() else Path(out_dir) / "gan.best.safetensors"


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
              val_limit: int | None = None, device: Any = None) -> dict[str, Any]:
    """Run one training stage; its outputs land in ``out_dir``. ``device``: where it trains (None: CPU)."""
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
                         gan_val_fn(val, gen.stride) if val else None, cfg, out_dir, "gan", resume, sampler, progress,
                         device=device)

    if stage == "gan2":
        rc = preset.get("gan_refine")
        if not rc:
            raise ValueError(f"preset {preset_name} has no GAN refinement phase")
        from nucli.training.loop import load_checkpoint

        # both networks as the first phase left them (best generator, last discriminator); fresh optimisers
        load_checkpoint(out_dir / "gan.ckpt.safetensors", {"gen": gen, "disc": disc}, {})
        load_module(out_dir / "gan.best.safetensors", gen)
        ep = rc["epochs"] if epochs is None else epochs
        steps = steps_for(ep, len(train), batch)
        sampler = CropSampler(train, crop, batch, seed=seed + 40)
        cfg = GanConfig(steps=steps, lr=rc["lr"], lam=preset["gan"]["lam"],
                        ckpt_every=max(min(50, steps), 1), val_every=max(min(100, steps), 1))
        return train_gan(gen, disc, lambda i: _torch_batch(sampler.next()),
                         gan_val_fn(val, gen.stride) if val else None, cfg, out_dir, "gan2", resume, sampler, progress,
                         device=device)

    if stage in ("unet", "raw", "finetune", "rawft"):
        uc = preset["finetune"] if stage in ("finetune", "rawft") else preset["unet_train"]
        ep = uc["epochs"] if epochs is None else epochs
        steps = steps_for(ep, len(train), batch)
        sampler = CropSampler(train, crop, batch,
                              seed=seed + {"unet": 10, "raw": 20, "finetune": 30, "rawft": 50}[stage])
        if stage == "unet":
            def next_batch(i):
                b = sampler.next()
                return _torch_batch({"x": degrade(b["ideal"], rng), "cls": b["cls"]})
            val_in = lambda s: s.ideal.astype(np.float32)  # noqa: E731
        elif stage in ("raw", "rawft"):
            if stage == "rawft":  # the ablation's mirror of ``finetune``: same schedule, raw gray inputs
                load_module(out_dir / "raw.best.safetensors", unet)

            def next_batch(i):
                b = sampler.next()
                return _torch_batch({"x": b["x"], "cls": b["cls"]})
            val_in = lambda s: s.x.astype(np.float32)  # noqa: E731
        else:
            load_module(generator_file(out_dir), gen)
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
        return train_supervised(unet, next_batch, loss_fn, vf, cfg, out_dir, stage, resume, sampler, progress,
                                device=device)
    raise ValueError(f"unknown stage {stage}")


# ---------------------------------------------------------------- export, tuning, the whole run
def method_config(preset_name: str, postprocess: dict[str, Any] | None = None, extra: dict[str, Any] | None = None):
    """The MethodConfig written beside (and inside) a trained weights file."""
    from nucli.models.gensegnet import CONFIG

    preset = PRESETS[preset_name]
    data = CONFIG.to_dict()
    params = dict(data["params"])
    params.update({"preset": preset_name, "generator": dict(preset["generator"]),
                   "unet": {"widths": list(preset["unet"]["widths"])}})
    if postprocess is not None:
        params["postprocess"] = dict(postprocess)
    params.update(extra or {})
    data["params"] = params
    from nucli.models.base import MethodConfig

    return MethodConfig.from_dict(data)


def export_weights(path: Path, gen: Any, unet: Any, config: Any, extra: dict[str, str] | None = None) -> Path:
    """Generator + U-Net -> one nucli safetensors file (method 'gensegnet', config in metadata)."""
    from nucli.models.weights_io import save_weights

    tensors = {f"generator.{k}": v for k, v in gen.state_dict().items()}
    tensors.update({f"unet.{k}": v for k, v in unet.state_dict().items()})
    return save_weights(Path(path), tensors, "gensegnet", config.to_dict(), extra)


def _val_probs(method: Any, samples: list) -> list[np.ndarray]:
    out = []
    for s in samples:
        x = np.clip(s.x.astype(np.float32), 0, 1)
        out.append(method.classify(method._run(method.generator, method._to_tensor(x[None]))[:, 0].numpy())[0])
    return out


def score_labels(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean AJI / PQ / F1 / Dice over (true, pred) label pairs, using nucli.metrics."""
    from nucli.metrics import evaluate_image

    per = [evaluate_image(t, p) for t, p in pairs]
    keys = [k for k in per[0] if k not in ("n_true", "n_pred")] if per else []
    return {k: float(np.mean([m[k] for m in per])) for k in keys}


def tune_postprocess(probs: list[np.ndarray], labels: list[np.ndarray], start: dict[str, Any] | None = None,
                     rounds: int = 2) -> tuple[dict[str, Any], dict[str, float]]:
    """Coordinate search of the post-processing thresholds maximising mean (AJI + PQ) / 2 on val."""
    from nucli.models.gensegnet.postprocess import PostprocessParams, instances_from_probs

    grid = {
        "band_bias": [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5],
        "body_threshold": [0.3, 0.4, 0.5, 0.6, 0.7],
        "background_threshold": [0.3, 0.4, 0.5, 0.6, 0.7],
        "min_area": [4, 10, 20, 30],
        "min_seed_area": [1, 3, 6],
        "split_h": [0.0, 1.0, 2.0, 3.0, 5.0],
    }
    cur = dict(PostprocessParams().__dict__)
    cur.update(start or {})

    def evaluate(p: dict[str, Any]) -> dict[str, float]:
        pp = PostprocessParams.from_dict(p)
        return score_labels([(t, instances_from_probs(pr, pp)) for pr, t in zip(probs, labels)])

    best_m = evaluate(cur)
    obj = lambda m: 0.5 * (m["aji"] + m["pq"])  # noqa: E731
    for _ in range(rounds):
        changed = False
        for key, values in grid.items():
            for v in values:
                if v == cur[key]:
                    continue
                trial = dict(cur, **{key: v})
                m = evaluate(trial)
                if obj(m) > obj(best_m) + 1e-4:
                    cur, best_m, changed = trial, m, True
            log.info("tune %s -> %s (AJI %.4f PQ %.4f)", key, cur[key], best_m["aji"], best_m["pq"])
        if not changed:
            break
    return cur, best_m


def assemble_raw(out_dir: Path, preset_name: str, val_dir: Path | None) -> dict[str, Any]:
    """Export the ablation (U-Net trained on raw gray images, no enhancement), thresholds tuned on val."""
    import json

    from nucli.models.gensegnet.generator import PassThrough
    from nucli.models.gensegnet.method import GenSegNet
    from nucli.training.data import load_dataset, val_crops
    from nucli.training.loop import load_module

    out_dir = Path(out_dir)
    _, _, unet = build_networks(PRESETS[preset_name])
    stage = "rawft" if (out_dir / "rawft.best.safetensors").exists() else "raw"
    load_module(out_dir / f"{stage}.best.safetensors", unet)
    gen = PassThrough()
    val = val_crops(load_dataset(val_dir, out_dir / "cache"), 512) if val_dir else []
    cfg = method_config(preset_name, extra={"generator": None, "segmentation_stage": stage})
    params, metrics = (tune_postprocess(_val_probs(GenSegNet(cfg, gen, unet), val), [s.labels for s in val])
                       if val else (dict(cfg.params["postprocess"]), {}))
    cfg = method_config(preset_name, params, {"generator": None, "segmentation_stage": stage})
    weights = export_weights(out_dir / f"gensegnet_{preset_name}_noenhance.safetensors", gen, unet, cfg)
    summary = {"weights": str(weights), "postprocess": params, "val": metrics}
    (out_dir / f"gensegnet_{preset_name}_noenhance.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def assemble(out_dir: Path, preset_name: str, val_dir: Path | None, unet_stage: str | None = None,
             tune: bool = True) -> dict[str, Any]:
    """Combine the best generator and U-Net, tune thresholds on val, write weights + config.

    When both ``unet`` (trained on ideal images) and ``finetune`` (on generator
    outputs) exist, both are scored on val and the better one is kept (both
    scores are returned for the model card).
    """
    import json

    from nucli.models.gensegnet.method import GenSegNet
    from nucli.training.data import load_dataset, val_crops
    from nucli.training.loop import load_module

    out_dir = Path(out_dir)
    preset = PRESETS[preset_name]
    gen, _, unet = build_networks(preset)
    load_module(generator_file(out_dir), gen)
    candidates = [unet_stage] if unet_stage else [s for s in ("unet", "finetune")
                                                  if (out_dir / f"{s}.best.safetensors").exists()]
    # centre crops (<= 512 px) of the val images keep threshold tuning affordable on a CPU
    val = val_crops(load_dataset(val_dir, out_dir / "cache"), 512) if val_dir else []
    results: dict[str, Any] = {}
    best_stage, best_obj = None, -1.0
    for stage in candidates:
        load_module(out_dir / f"{stage}.best.safetensors", unet)
        cfg = method_config(preset_name)
        method = GenSegNet(cfg, gen, unet)
        if val and tune:
            probs = _val_probs(method, val)
            params, metrics = tune_postprocess(probs, [s.labels for s in val])
        else:
            params, metrics = dict(cfg.params["postprocess"]), {}
        results[stage] = {"postprocess": params, "val": metrics}
        o = 0.5 * (metrics.get("aji", 0) + metrics.get("pq", 0))
        if best_stage is None or o > best_obj:
            best_stage, best_obj = stage, o
    load_module(out_dir / f"{best_stage}.best.safetensors", unet)
    cfg = method_config(preset_name, results[best_stage]["postprocess"], {"segmentation_stage": best_stage})
    weights = export_weights(out_dir / f"gensegnet_{preset_name}.safetensors", gen, unet, cfg)
    summary = {"weights": str(weights), "chosen_unet": best_stage, "candidates": results, "config": cfg.to_dict()}
    (out_dir / f"gensegnet_{preset_name}.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def write_card(path: Path, summary: dict[str, Any], extra_sections: dict[str, str] | None = None) -> Path:
    """A short model card (markdown) from a training summary; extra sections are appended verbatim."""
    cfg = summary.get("config", {})
    params = cfg.get("params", {})
    lines = [
        f"# GeNSeg-Net ({params.get('preset', '?')} preset)", "",
        f"- data: {summary.get('data')} (val for selection: {summary.get('val')})",
        f"- stages: {json_line(summary.get('stages'))}",
        f"- chosen segmentation U-Net: {summary.get('chosen_unet')}",
        f"- generator: {json_line(params.get('generator'))}; U-Net widths {params.get('unet', {}).get('widths')}",
        f"- post-processing (tuned on val): {json_line(params.get('postprocess'))}",
        f"- working pixel size (assumed): {cfg.get('mpp')} um/px; typical nucleus {cfg.get('nucleus_diameter_px')} px",
        f"- val metrics: {json_line({k: v.get('val') for k, v in (summary.get('candidates') or {}).items()})}",
        f"- total wall time: {summary.get('wall_s')} s", "",
    ]
    for title, text in (extra_sections or {}).items():
        lines += [f"## {title}", "", text.strip(), ""]
    text = "\n".join(lines)
    tmp = Path(path).with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return Path(path)


def json_line(obj: Any) -> str:
    import json

    def _round(o):
        if isinstance(o, float):
            return round(o, 4)
        if isinstance(o, dict):
            return {k: _round(v) for k, v in o.items()}
        if isinstance(o, list):
            return [_round(v) for v in o]
        return o

    return json.dumps(_round(obj), default=str)


def train_gensegnet(train_dir: Path, out_dir: Path, val_dir: Path | None = None, preset: str = "cpu",
                    epochs: float | None = None, resume: bool = False, finetune: bool = True,
                    threads: int | None = None, limit: int | None = None, seed: int = 0,
                    crop: int | None = None, batch: int | None = None,
                    progress: Callable[[str, int, int], None] | None = None, device: Any = None) -> dict[str, Any]:
    """Train both stages (GAN, U-Net on ideal images, optional fine-tune), tune on val, export.

    ``device`` (None: the CPU): where the networks train (a GPU in mixed precision).

    ``epochs`` scales every stage relative to the preset's GAN epochs. Writes
    ``gensegnet_<preset>.safetensors``, ``.json`` and ``.md`` into ``out_dir``.
    """
    import time

    import torch

    from nucli.errors import UsageError

    if preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    if threads:
        torch.set_num_threads(int(threads))
    p = PRESETS[preset]
    scale = 1.0 if epochs is None else float(epochs) / p["epochs"]
    t0 = time.time()
    out_dir = Path(out_dir)
    stages: dict[str, Any] = {}
    plan = [("gan", p["epochs"])]
    if p.get("gan_refine"):
        plan.append(("gan2", p["gan_refine"]["epochs"]))
    plan.append(("unet", p["unet_train"]["epochs"]))
    if finetune:
        plan.append(("finetune", p["finetune"]["epochs"]))
    for stage, ep in plan:
        cb = (lambda s, n, parts, _st=stage: progress(_st, s, n)) if progress else None
        stages[stage] = run_stage(stage, train_dir, val_dir, out_dir, preset, epochs=ep * scale, resume=resume,
                                  seed=seed, limit=limit, progress=cb, crop=crop, batch=batch, device=device)
    summary = assemble(out_dir, preset, val_dir, tune=val_dir is not None)
    summary.update({"data": str(train_dir), "val": str(val_dir) if val_dir else None, "stages": stages,
                    "wall_s": round(time.time() - t0, 1)})
    import json

    (out_dir / f"gensegnet_{preset}.json").write_text(json.dumps(summary, indent=2, default=float))
    write_card(out_dir / f"gensegnet_{preset}.md", summary)
    return summary
