"""Fine-tune GeNSeg-Net or HARU-Net on several sets at once, at one working scale.

What ``nucli train --data A --data B ...`` runs (two or more ``--data`` sets, or one
set with ``index.json``). Each run starts from an existing weights file of the method
(``--init``, default the shipped weights) and continues training on balanced, stain-
augmented crops of every set (:mod:`nucli.training.multiset`):

* GeNSeg-Net: generator and U-Net are trained together, end to end: the generator's
  L1 loss against the ideal-nucleus image plus the U-Net's cross-entropy + Dice on the
  generator's output. (The adversarial term of the first GAN phase is not used here.)
* HARU-Net: its own foreground + contour loss.

Model selection: every ``val_every`` steps the whole method (network + post-processing)
segments centre crops of every set's val images; the score is the mean over sets (each
set counted once) of (AJI + PQ) / 2. At the end, post-processing thresholds are tuned on
the same crops with the same objective, and weights + JSON summary are written.
Checkpoints every ``ckpt_every`` steps; ``resume=True`` continues from the last one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nucli.errors import UsageError
from nucli.training import multiset as ms

log = logging.getLogger("nucli.training")

VAL_CROP = 384
VAL_PER_SET = 40
#: GeNSeg-Net: weight of the generator's L1 loss (about 0.05) against the U-Net's CE + 3 Dice (about 1)
L1_WEIGHT = 10.0  # at most this many val images per set for the periodic selection (all are used by evaluate)


def _score(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    from nucli.metrics import mean_metrics, score_image

    m = mean_metrics([score_image(t, p) for t, p in pairs])
    return {"aji": float(m["aji"]), "pq": float(m["pq"]), "dice": float(m["dice"])}


def _objective(per_set: dict[str, dict[str, float]]) -> float:
    return 0.5 * (ms.mean_over_sets(per_set, "aji") + ms.mean_over_sets(per_set, "pq"))


# ------------------------------------------------------------------ GeNSeg-Net
class _GenSeg:
    """Generator + U-Net as one trainable torch module (built lazily to keep torch out of import)."""

    @staticmethod
    def make(gen, unet):
        import torch

        class Joint(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.generator = gen
                self.unet = unet

            def forward(self, x):
                e = self.generator(x)
                return e, self.unet(e)

        return Joint()


def _gensegnet_targets(lab: np.ndarray) -> dict[str, np.ndarray]:
    from nucli.training.targets import class_map, ideal_image

    return {"ideal": ideal_image(lab)[None].astype(np.float32), "cls": class_map(lab, 2).astype(np.int64)}


def _harunet_targets(lab: np.ndarray) -> dict[str, np.ndarray]:
    from nucli.models.harunet import DEFAULT_PARAMS
    from nucli.training.harunet_targets import contour_map

    return {"fg": (lab > 0).astype(np.float32), "contour": contour_map(lab, int(DEFAULT_PARAMS["contour_thickness"]))
            .astype(np.float32)}


def _widen_input(tensors: dict, params: dict[str, Any], in_channels: int | None) -> None:
    """Give a 1-channel generator ``in_channels`` inputs; the new ones start with zero weights.

    The widened network computes exactly what the stored one did until training teaches it to
    use the red and blue channels (``nucli.models.gensegnet.preprocess.normalize_channels``).
    """
    import torch

    gen = params.get("generator")
    if not in_channels or gen is None:
        return
    have = int(gen.get("in_channels", 1))
    if in_channels == have:
        return
    if have != 1 or in_channels != 3:
        raise UsageError(f"--input-channels {in_channels}: only 1-channel weights can be widened to 3 channels")
    key = "generator.head.0.weight"
    w = tensors[key]
    tensors[key] = torch.cat([w, torch.zeros((w.shape[0], in_channels - 1) + tuple(w.shape[2:]), dtype=w.dtype)], 1)
    params["generator"] = {**gen, "in_channels": in_channels}


def _load_init(method: str, init: Path, in_channels: int | None = None):
    """(trainable module, method config dict, make_method(module, params) -> nucli Method)."""
    if method == "gensegnet":
        from nucli.models.base import MethodConfig
        from nucli.models.gensegnet import CONFIG
        from nucli.models.gensegnet.method import GenSegNet, networks_from_params
        from nucli.models.weights_io import load_into, load_weights

        tensors, stored = load_weights(init, "gensegnet")
        params = {**CONFIG.params, **dict(stored.get("params") or {})}
        tensors = dict(tensors)
        _widen_input(tensors, params, in_channels)
        gen, unet = networks_from_params(params)
        load_into(gen, {k[10:]: v for k, v in tensors.items() if k.startswith("generator.")}, init, method)
        load_into(unet, {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}, init, method)
        joint = _GenSeg.make(gen, unet)
        base = {**CONFIG.to_dict(), "params": params}

        def make(module, pp: dict[str, Any] | None = None):
            cfg = dict(base)
            cfg["params"] = {**params, **({"postprocess": pp} if pp else {})}
            m = GenSegNet(MethodConfig.from_dict(cfg), module.generator, module.unet)
            m.bf16 = False
            return m

        return joint, base, make
    if method == "harunet":
        from nucli.models.base import MethodConfig
        from nucli.models.harunet import DEFAULT_CONFIG, DEFAULT_PARAMS, HARUNetMethod, load_network

        net, stored = load_network(init)
        params = {**DEFAULT_PARAMS, **dict(stored.get("params") or {})}
        base = {**DEFAULT_CONFIG.to_dict(), "params": params}

        def make(module, pp: dict[str, Any] | None = None):
            cfg = dict(base)
            cfg["params"] = {**params, **(pp or {})}
            return HARUNetMethod(MethodConfig.from_dict(cfg), module, "cpu")

        return net, base, make
    raise UsageError(f"training on several sets supports gensegnet and harunet, not '{method}'")


def _loss(method: str) -> Callable:
    import torch

    if method == "gensegnet":
        from nucli.training.losses import ce_dice_loss

        def loss(model, b):
            e, logits = model(b["x"])
            l1 = torch.nn.functional.l1_loss(e, b["ideal"])
            seg, parts = ce_dice_loss(logits, b["cls"], 1.0, 3.0)
            return L1_WEIGHT * l1 + seg, {"l1": l1.item(), **parts}
        return loss
    from nucli.training.harunet_loss import HARUNetLoss

    crit = HARUNetLoss()

    def loss(model, b):
        fused, sides = model(b["x"])
        return crit(fused, sides, torch.stack([b["fg"], b["contour"]], 1))
    return loss


def _segment(make_method, module, crops: list[ms.ScaledImage], pp=None) -> list[np.ndarray]:
    m = make_method(module, pp)
    return [np.asarray(m.postprocess(m.infer(c.rgb[None]))[0].labels) for c in crops]


def _per_set(make_method, module, val: dict[str, list[ms.ScaledImage]], pp=None) -> dict[str, dict[str, float]]:
    return {name: _score([(c.labels, p) for c, p in zip(crops, _segment(make_method, module, crops, pp))])
            for name, crops in val.items()}


TUNE_GRID = {
    "gensegnet": {"body_threshold": [0.3, 0.4, 0.5, 0.6], "background_threshold": [0.3, 0.4, 0.5],
                  "band_bias": [-0.5, 0.0, 0.5, 1.0], "min_area": [6, 10, 20], "split_h": [0.0, 1.0, 2.0]},
    "harunet": {"mask_threshold": [0.4, 0.5, 0.6], "contour_threshold": [0.2, 0.3, 0.4, 0.5],
                "min_area": [6, 10, 20], "min_seed_area": [2, 4, 8]},
}


def tune(method: str, make_method, module, val: dict[str, list[ms.ScaledImage]], start: dict[str, Any]
         ) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Coordinate search of post-processing thresholds; the network runs once per crop."""
    m = make_method(module, None)
    raw = {name: [m.infer(c.rgb[None]) for c in crops] for name, crops in val.items()}

    def evaluate(pp: dict[str, Any]) -> dict[str, dict[str, float]]:
        mm = make_method(module, pp)
        return {name: _score([(c.labels, np.asarray(mm.postprocess(r)[0].labels)) for c, r in zip(val[name], rs)])
                for name, rs in raw.items()}

    cur = dict(start)
    best = evaluate(cur)
    for _ in range(2):
        changed = False
        for key, values in TUNE_GRID[method].items():
            for v in values:
                if cur.get(key) == v:
                    continue
                trial = {**cur, key: v}
                res = evaluate(trial)
                if _objective(res) > _objective(best) + 1e-4:
                    cur, best, changed = trial, res, True
            log.info("tune %s -> %s (%.4f)", key, cur.get(key), _objective(best))
        if not changed:
            break
    return cur, best


def train_multi(method: str, sets: list[ms.DataSet], out_dir: Path, init: Path, *, steps: int = 2000,
                crop: int = 256, batch: int = 6, lr: float = 2e-4, seed: int = 0, resume: bool = False,
                stain_aug: bool = True, val_every: int = 250, ckpt_every: int = 25, threads: int | None = None,
                limit: int | None = None, val_limit: int | None = VAL_PER_SET, tune_thresholds: bool = True,
                stop_after: int | None = None, in_channels: int | None = None,
                progress: Callable[[int, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``method`` from ``init`` on ``sets``; writes ``{method}_multi.safetensors`` + ``.json``."""
    import torch

    from nucli.training.loop import LoopConfig, train_supervised

    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    t0 = time.time()
    out_dir = Path(out_dir)
    ms.load_sets(sets, out_dir / "cache", limit=limit)
    if method == "harunet" and in_channels not in (None, 1):
        raise UsageError("--input-channels: only gensegnet takes colour input")
    module, base, make = _load_init(method, Path(init), in_channels)
    targets = _gensegnet_targets if method == "gensegnet" else _harunet_targets
    channels = getattr(getattr(module, "generator", None), "in_channels", 1)  # harunet / PassThrough: 1
    sampler = ms.MultiSetSampler(sets, crop, batch, targets, seed=seed, stain_aug=stain_aug, channels=channels)
    val = ms.val_images(sets, VAL_CROP, val_limit)
    make(module, None)  # outside inference mode: the method puts the networks in channels-last layout once

    def val_fn(model):
        per = _per_set(make, model, val)
        return _objective(per), {f"{n}_aji": round(v["aji"], 4) for n, v in per.items()}

    def next_batch(step: int):
        return {k: torch.from_numpy(v) for k, v in sampler.next().items()}

    cfg = LoopConfig(steps=steps, lr=lr, ckpt_every=ckpt_every, val_every=val_every, log_every=10,
                     decay_start=0.5, higher_is_better=True, stop_at=stop_after)
    run = train_supervised(module, next_batch, _loss(method), val_fn if val else None, cfg, out_dir,
                           f"{method}_multi", resume=resume, sampler=sampler, progress=progress)
    module.eval()
    pp_key = "postprocess"
    if method == "gensegnet":
        start = dict(base["params"].get(pp_key) or {})
    else:
        start = {k: base["params"][k] for k in TUNE_GRID["harunet"]}
    if tune_thresholds and val:
        pp, per_set = tune(method, make, module, val, start)
    else:
        pp, per_set = start, (_per_set(make, module, val, start) if val else {})
    summary = {
        "method": method, "init": str(init), "steps": run["steps"], "best_step": run["best_step"],
        "wall_s": round(time.time() - t0, 1), "train_wall_s": run["wall_s"], "crop": crop, "batch": batch, "lr": lr,
        "stain_aug": stain_aug, "input_channels": channels, "working_mpp": ms.WORKING_MPP, "reference_diameter_px": ms.REFERENCE_DIAMETER_PX,
        "sets": {s.name: {"path": str(s.root), "weight": s.weight, "train": len(s.train), "val": len(s.val)}
                 for s in sets},
        "sampling": sampler.probabilities(), "postprocess": pp, "val_crops": per_set,
        "val_objective": _objective(per_set) if per_set else None,
    }
    weights = export(method, module, base, pp, out_dir / f"{method}_multi.safetensors", summary)
    summary["weights"] = str(weights)
    (out_dir / f"{method}_multi.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def export(method: str, module, base: dict[str, Any], pp: dict[str, Any], path: Path, summary: dict[str, Any]
           ) -> Path:
    """The fine-tuned networks as a nucli weights file whose config records the working scale."""
    from nucli.models.weights_io import save_weights

    cfg = json.loads(json.dumps(base))
    cfg["mpp"] = ms.WORKING_MPP
    cfg["nucleus_diameter_px"] = ms.REFERENCE_DIAMETER_PX
    params = cfg["params"]
    if method == "gensegnet":
        params["postprocess"] = dict(pp)
        tensors = {f"generator.{k}": v for k, v in module.generator.state_dict().items()}
        tensors.update({f"unet.{k}": v for k, v in module.unet.state_dict().items()})
    else:
        params.update(pp)
        tensors = dict(module.state_dict())
    params["working_scale"] = {"mpp": ms.WORKING_MPP, "reference_diameter_px": ms.REFERENCE_DIAMETER_PX}
    # --mpp auto: bring the median nucleus to the training reference size, enlarging or shrinking
    params["auto_scale"] = {"ratio": 1.0, "shrink": True}
    params["training_sets"] = sorted(summary["sets"])
    extra = {"nucli.train.steps": str(summary["steps"]), "nucli.train.sets": ",".join(sorted(summary["sets"]))}
    return save_weights(path, tensors, method, cfg, extra)
