"""Train HARU-Net with the shared loop (:func:`nucli.training.loop.train_supervised`).

Data come from the shared loader (:func:`nucli.training.data.load_dataset`,
same grayscale/normalisation as inference) and the shared augmented crop
sampler. The sampler crops and augments three aligned maps per image; for
HARU-Net its two target slots carry the thickened contour map and the
foreground mask (see :func:`harunet_samples`). Validation runs the full
method (network + Algorithm-1 post-processing) on centre crops of the
validation images and scores mean AJI and PQ; the model with the best
``(AJI + PQ) / 2`` is kept and exported as a nucli weights file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger("nucli.training")

NAME = "harunet"


def harunet_samples(samples: list[Any], thickness: int) -> list[Any]:
    """Shared ``Sample``s -> the same images with HARU-Net targets in the sampler's target slots.

    ``ideal`` (float slot) <- thickened contour map, ``cls`` (integer slot) <- foreground mask.
    """
    from dataclasses import replace

    from nucli.training.harunet_targets import contour_map

    return [
        replace(s, ideal=contour_map(s.labels, thickness).astype(np.float16), cls=(s.labels > 0).astype(np.uint8))
        for s in samples
    ]


def batch_to_tensors(batch: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """Sampler batch -> (x (B,1,S,S), target (B,2,S,S) [foreground, contour]) float tensors."""
    import torch

    x = torch.from_numpy(batch["x"])
    target = torch.cat([torch.from_numpy(batch["cls"][:, None].astype(np.float32)), torch.from_numpy(batch["ideal"])], 1)
    return x, target


def validation_fn(val_samples: list[Any], params: dict[str, Any]) -> Callable[[Any], tuple[float, dict[str, float]]]:
    """Closure scoring a network on ``val_samples`` (mean AJI, PQ, Dice over images)."""
    from nucli.metrics import mean_metrics, score_image
    from nucli.models.harunet import maps_to_labels, predict_maps

    def val(model: Any) -> tuple[float, dict[str, float]]:
        counts = []
        for s in val_samples:
            maps = predict_maps(model, s.x.astype(np.float32)[None])[0]
            counts.append(score_image(s.labels, maps_to_labels(maps, params)))
        m = mean_metrics(counts)
        return (m["aji"] + m["pq"]) / 2.0, {"aji": m["aji"], "pq": m["pq"], "dice": m["dice"]}

    return val


TUNE_GRID: dict[str, tuple[float, ...]] = {
    "mask_threshold": (0.4, 0.5, 0.6),
    "contour_threshold": (0.2, 0.3, 0.4, 0.5),
    "min_area": (10, 20, 30),
    "min_seed_area": (2, 4, 8),
}


def tune_postprocess(model: Any, val_samples: list[Any], grid: dict[str, tuple[float, ...]] | None = None
                     ) -> tuple[dict[str, Any], dict[str, float]]:
    """Pick post-processing thresholds on validation images (network run once per image).

    Returns (best params, their mean metrics); the score is ``(AJI + PQ) / 2``.
    """
    import itertools

    from nucli.metrics import mean_metrics, score_image
    from nucli.models.harunet import DEFAULT_CONFIG, DEFAULT_PARAMS, maps_to_labels, predict_maps

    grid = grid or TUNE_GRID
    cap = float(DEFAULT_CONFIG.max_nucleus_diameter_px)
    model.eval()
    maps = [predict_maps(model, s.x.astype(np.float32)[None])[0] for s in val_samples]
    best: tuple[float, dict[str, Any], dict[str, float]] | None = None
    keys = sorted(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        params = {**DEFAULT_PARAMS, **dict(zip(keys, values))}
        m = mean_metrics([score_image(s.labels, maps_to_labels(mp, params, cap)) for s, mp in zip(val_samples, maps)])
        score = (m["aji"] + m["pq"]) / 2.0
        if best is None or score > best[0]:
            best = (score, params, m)
    assert best is not None
    return best[1], best[2]


def export_weights(model: Any, path: Path, preset: str, extra: dict[str, str] | None = None,
                   params: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a nucli weights file for method ``harunet`` (preset and thresholds in its config)."""
    from nucli.models.harunet import DEFAULT_CONFIG
    from nucli.models.weights_io import save_weights

    cfg = DEFAULT_CONFIG.to_dict()
    cfg["params"] = {**cfg["params"], **(params or {}), "preset": preset}
    return save_weights(Path(path), model.state_dict(), NAME, cfg, extra=extra)


def train_harunet(
    train_dir: Path,
    out_dir: Path,
    val_dir: Path | None = None,
    preset: str = "cpu",
    steps: int = 6000,
    crop: int = 256,
    batch: int = 4,
    lr: float = 1e-3,
    val_every: int = 250,
    ckpt_every: int = 25,
    val_size: int = 256,
    val_limit: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    resume: bool = False,
    threads: int | None = None,
    weights_out: Path | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    tune: bool = True,
    device: Any = None,
) -> dict[str, Any]:
    """Train (or resume) HARU-Net; export the val-selected model to ``weights_out``.

    ``device`` (None: the CPU): where the network trains (a GPU in mixed precision).

    Run files (checkpoint, best model, JSON-lines log, data cache) live in
    ``out_dir``; ``resume=True`` continues from the last checkpoint.
    """
    import torch

    from nucli.errors import UsageError
    from nucli.models.harunet import DEFAULT_PARAMS, PRESET_NAMES, build_network
    from nucli.training.data import CropSampler, load_dataset, val_crops
    from nucli.training.harunet_loss import HARUNetLoss
    from nucli.training.loop import LoopConfig, train_supervised

    if preset not in PRESET_NAMES:
        raise UsageError(f"unknown HARU-Net preset '{preset}'; choose one of: {', '.join(PRESET_NAMES)}")
    if crop % 32:
        raise UsageError(f"--crop must be a multiple of 32 for HARU-Net, got {crop}")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    cache = out_dir / "cache"
    thickness = int(DEFAULT_PARAMS["contour_thickness"])
    t0 = time.time()
    train = harunet_samples(load_dataset(train_dir, cache_dir=cache, limit=limit), thickness)
    val_fn, val = None, []
    if val_dir is not None:
        val = val_crops(load_dataset(val_dir, cache_dir=cache), val_size, limit=val_limit)
        val_fn = validation_fn(val, DEFAULT_PARAMS)
    log.info("data ready in %.0fs: %d training images", time.time() - t0, len(train))

    sampler = CropSampler(train, crop=crop, batch=batch, seed=seed)
    net = build_network(preset)
    criterion = HARUNetLoss()

    def next_batch(step: int) -> tuple[Any, Any]:
        return batch_to_tensors(sampler.next())

    def loss_fn(model: Any, b: tuple[Any, Any]) -> tuple[Any, dict[str, float]]:
        fused, sides = model(b[0])
        return criterion(fused, sides, b[1])

    cfg = LoopConfig(steps=steps, lr=lr, ckpt_every=ckpt_every, val_every=val_every, log_every=10,
                     decay_start=0.5, higher_is_better=True)
    summary = train_supervised(net, next_batch, loss_fn, val_fn, cfg, out_dir, NAME, resume=resume,
                               sampler=sampler, progress=progress, device=device)
    params = None
    if tune and val:
        # thresholds on the full val images: centre crops cut nuclei at their borders
        full_val = load_dataset(val_dir, cache_dir=cache, limit=val_limit)
        params, metrics = tune_postprocess(net, full_val)
        summary["postprocess"] = {k: params[k] for k in TUNE_GRID}
        summary["val_tuned"] = {k: round(metrics[k], 4) for k in ("aji", "pq", "dice")}
        log.info("post-processing tuned on val: %s -> %s", summary["postprocess"], summary["val_tuned"])
    if weights_out is not None:
        export_weights(net, Path(weights_out), preset, params=params, extra={
            "nucli.train.steps": str(summary["steps"]),
            "nucli.train.best_step": str(summary["best_step"]),
            "nucli.train.crop": str(crop), "nucli.train.batch": str(batch),
        })
        summary["weights"] = str(weights_out)
    return summary


# epochs of the `nucli train --method harunet` presets (one epoch = one random crop per training image)
PRESET_SCHEDULE: dict[str, dict[str, Any]] = {
    "cpu": {"epochs": 29, "crop": 256, "batch": 4, "lr": 1e-3},
    "paper": {"epochs": 200, "crop": 512, "batch": 4, "lr": 1e-3},
}


def train_from_options(data: Path, output: Path, val: Path | None = None, *, preset: str = "cpu",
                       epochs: float | None = None, resume: bool = False, threads: int | None = None,
                       progress: Any = None, device: Any = None) -> dict[str, Any]:
    """What `nucli train --method harunet` runs; writes OUTDIR/harunet_<preset>.safetensors (+ .json)."""
    import json

    from nucli.training.data import list_pairs

    sched = PRESET_SCHEDULE.get(preset)
    if sched is None:
        from nucli.errors import UsageError

        raise UsageError(f"unknown HARU-Net preset '{preset}'; choose one of: {', '.join(PRESET_SCHEDULE)}")
    n_images = len(list_pairs(Path(data)))
    steps = max(int(round((epochs or sched["epochs"]) * n_images / sched["batch"])), 1)
    weights = Path(output) / f"{NAME}_{preset}.safetensors"

    def report(step: int, total: int, parts: dict[str, float]) -> None:
        if progress is not None:
            progress(NAME, step, total)

    summary = train_harunet(Path(data), Path(output), val_dir=Path(val) if val else None, preset=preset,
                            steps=steps, crop=sched["crop"], batch=sched["batch"], lr=sched["lr"], resume=resume,
                            threads=threads, weights_out=weights, progress=report, device=device)
    from nucli.evaluation.labels_io import write_text_atomic

    write_text_atomic(json.dumps(summary, indent=2, default=str) + "\n", weights.with_suffix(".json"))
    return summary
