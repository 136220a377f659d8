"""Mutual complementing: the training procedure of MCF (paper 2.2.3-2.3).

Each round:

1. the detection branch (current template bank) runs on every training image
   (labels are never read for this) and gives confident pseudo masks;
2. the U-Net is trained with the confidence loss on them plus plain CE on
   synthetic samples (warm-started from the previous round);
3. it is finetuned on its own confident predictions (self-finetuning);
4. the mask residual between its nuclei (``p1 > t4``) and the detection's
   confident nuclei proposes missing nuclei: segmented nuclei that no detected
   nucleus touches, of a plausible size (between half the smallest and the
   largest template diameter) and compact (solidity >= 0.8), ranked by mean
   probability x solidity, one per image. Each candidate, best first, is kept
   only if it raises the agreement between detection and segmentation (an F1
   of detected centres vs segmented nuclei on 30 training images, no labels);
   at most ``new_templates`` are added per round, for the next round.

When the training images have labels, each round logs -- for reporting only,
never to choose anything -- detection precision/recall/F1 (a centre inside a
nucleus is a hit, one per nucleus), the precision of the pseudo masks, the
segmentation Dice, and instance metrics of the full method and of the
detection branch alone. The same is logged for ``eval_dir`` when given.

Run files live in ``out_dir``: ``roundN.safetensors`` (bank + U-Net after
round N; a rerun with ``resume=True`` continues after the last finished
round), the shared loop's checkpoints and JSON-lines logs per stage, and
``rounds.jsonl`` (one line of metrics per round).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nucli.errors import InputError
from nucli.models.mcf.confidence import T1, T2, T3, T4

log = logging.getLogger("nucli.mcf")

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclass
class TrainSettings:
    rounds: int = 3
    seg_steps: tuple[int, ...] = (1200, 500)  # round 1, later rounds (warm start)
    self_steps: tuple[int, ...] = (400, 200)
    crop: int = 128
    batch: int = 6  # real crops per step (confidence loss)
    syn_batch: int = 2  # synthetic crops per step (CE)
    lr: float = 1e-3
    self_lr: float = 3e-4
    new_templates: int = 3  # templates proposed by the mask residual per round
    t1: float = T1
    t2: float = T2
    t3: float = T3
    t4: float = T4
    dlt_ratio: float = 0.8
    bg_guard: float = 0.0  # > 0: no confident background within guard x patch of a detected centre
    limit: int | None = None  # training images used (first N in sorted order)
    metrics_limit: int = 40  # labelled images scored per round
    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64, 128)
    detector: dict[str, Any] = field(default_factory=dict)

    def steps(self, which: tuple[int, ...], r: int) -> int:
        return int(which[min(r - 1, len(which) - 1)])


@dataclass
class Image:
    name: str
    path: Path
    grey: np.ndarray  # (H, W) float16
    labels: np.ndarray | None = None  # ground truth, only for logging


# ---------------------------------------------------------------- data
def list_images(data_dir: Path, limit: int | None = None) -> list[tuple[Path, Path | None]]:
    data_dir = Path(data_dir)
    img_dir = data_dir / "images" if (data_dir / "images").is_dir() else data_dir
    if not img_dir.is_dir():
        raise InputError(f"training images not found: {data_dir} (expected a folder of images or DIR/images)")
    lab_dir = data_dir / "labels"
    labels = {p.stem: p for p in lab_dir.iterdir()} if lab_dir.is_dir() else {}
    files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise InputError(f"{img_dir}: no training images (.png, .tif, .jpg)")
    return [(p, labels.get(p.stem)) for p in files[:limit]]


def read_image(path: Path) -> np.ndarray:
    from nucli.models.mcf.templates import _read_image

    return _read_image(path)


def read_labels(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    import tifffile
    from PIL import Image as PILImage

    lab = tifffile.imread(path) if path.suffix.lower() in (".tif", ".tiff") else np.asarray(PILImage.open(path))
    return np.asarray(lab).astype(np.int32)


def load_images(data_dir: Path, limit: int | None = None, with_labels: bool = True) -> list[Image]:
    from nucli.models.mcf.features import prepare

    out = []
    for ip, lp in list_images(data_dir, limit):
        prep = prepare(read_image(ip))
        out.append(Image(ip.stem, ip, prep[0].astype(np.float16), read_labels(lp) if with_labels else None))
    return out


# ---------------------------------------------------------------- detection pass
def detect_all(bank: Any, images: list[Image], settings: TrainSettings,
               progress: Callable[[str, int, int], None] | None = None) -> list[dict[str, Any]]:
    """Detection on every image -> response (float16), centres, confident pseudo target."""
    from nucli.models.mcf.confidence import pseudo_target
    from nucli.models.mcf.features import prepare

    patch = bank.detector.middle_filter_px
    out: list[dict[str, Any]] = [{} for _ in images]
    # images of one size share the filters' spectra: visit them size by size
    order = sorted(range(len(images)), key=lambda i: images[i].grey.shape)
    for done, i in enumerate(order, start=1):
        det = bank.detector.detect(prepare(read_image(images[i].path)))
        target = pseudo_target(det.response, det.centres, patch, settings.t1, settings.dlt_ratio, settings.bg_guard)
        out[i] = {"response": det.response.astype(np.float16), "centres": det.centres, "target": target}
        if progress:
            progress("detect", done, len(images))
    return out


# ---------------------------------------------------------------- segmentation training
class SyntheticSource:
    """Synthetic (grey, label) crops from confident nuclei and confident backgrounds of the training images."""

    def __init__(self, images: list[Image], targets: list[np.ndarray], seed: int, max_nuclei: int = 4000,
                 max_backgrounds: int = 64):
        from nucli.models.mcf.confidence import confident_nuclei, pure_background

        self.rng = np.random.default_rng(seed)
        nuclei, backgrounds = [], []
        order = self.rng.permutation(len(images))
        for i in order:
            g = images[i].grey.astype(np.float32)
            nuclei.extend(confident_nuclei(g, targets[i]))
            if len(backgrounds) < max_backgrounds:
                bg = pure_background(g, targets[i], self.rng)
                if bg is not None:
                    backgrounds.append(bg)
        if len(nuclei) > max_nuclei:
            keep = self.rng.choice(len(nuclei), max_nuclei, replace=False)
            nuclei = [nuclei[j] for j in keep]
        self.nuclei, self.backgrounds = nuclei, backgrounds

    def __bool__(self) -> bool:
        return bool(self.nuclei) and bool(self.backgrounds)

    def batch(self, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        from nucli.models.mcf.confidence import synthesize
        from nucli.training.data import brightness_jitter

        xs, ys = [], []
        for _ in range(n):
            bg = self.backgrounds[int(self.rng.integers(len(self.backgrounds)))]
            x, y = synthesize(self.rng, bg, self.nuclei, size, n_paste=int(self.rng.integers(3, 12)))
            xs.append(brightness_jitter(x, self.rng))
            ys.append(y)
        return np.stack(xs)[:, None].astype(np.float32), np.stack(ys).astype(np.int64)

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class _Sampler:
    """Real crops (confidence targets) + synthetic crops; resumable through the shared loop."""

    def __init__(self, images: list[Image], targets: list[np.ndarray], settings: TrainSettings, seed: int,
                 synthetic: SyntheticSource | None):
        from nucli.training.data import CropSampler, Sample

        dummy = np.zeros((1, 1), np.int32)
        samples = [Sample(im.name, im.grey, im.grey, t, dummy) for im, t in zip(images, targets)]
        self.crops = CropSampler(samples, crop=settings.crop, batch=settings.batch, seed=seed)
        self.synthetic = synthetic if synthetic else None
        self.settings = settings

    def next(self) -> dict[str, np.ndarray]:
        b = self.crops.next()
        out = {"x": b["x"], "target": b["cls"]}
        if self.synthetic is not None and self.settings.syn_batch > 0:
            out["syn_x"], out["syn_y"] = self.synthetic.batch(self.settings.syn_batch, self.settings.crop)
        return out

    def state(self) -> dict:
        return {"crops": self.crops.state(), "syn": self.synthetic.state() if self.synthetic else None}

    def set_state(self, state: dict) -> None:
        self.crops.set_state(state["crops"])
        if self.synthetic is not None and state.get("syn") is not None:
            self.synthetic.set_state(state["syn"])


def train_stage(net: Any, images: list[Image], targets: list[np.ndarray], settings: TrainSettings, steps: int,
                lr: float, out_dir: Path, name: str, seed: int, synthetic: SyntheticSource | None,
                resume: bool, progress: Callable[[int, int, dict[str, float]], None] | None = None
                ) -> dict[str, Any]:
    """One training stage through the shared loop: confidence loss (+ CE on synthetic crops)."""
    import torch
    import torch.nn.functional as F

    from nucli.models.mcf.confidence import confidence_loss
    from nucli.training.loop import LoopConfig, train_supervised

    sampler = _Sampler(images, targets, settings, seed, synthetic)

    def next_batch(step: int) -> dict[str, np.ndarray]:
        return sampler.next()

    def loss_fn(model: Any, b: dict[str, np.ndarray]) -> tuple[Any, dict[str, float]]:
        x = torch.from_numpy(b["x"])
        target = torch.from_numpy(b["target"].astype(np.int64))
        if "syn_x" in b:
            x = torch.cat([x, torch.from_numpy(b["syn_x"])])
        logits = model(x)
        n = target.shape[0]
        conf = confidence_loss(logits[:n], target)
        parts = {"conf": float(conf.item())}
        loss = conf
        if "syn_x" in b:
            syn = F.cross_entropy(logits[n:], torch.from_numpy(b["syn_y"]))
            loss = loss + syn
            parts["syn"] = float(syn.item())
        return loss, parts

    cfg = LoopConfig(steps=steps, lr=lr, ckpt_every=50, val_every=10 ** 9, log_every=10, decay_start=0.6)
    return train_supervised(net, next_batch, loss_fn, None, cfg, out_dir, name, resume=resume, sampler=sampler,
                            progress=progress)


def predict_all(net: Any, images: list[Image]) -> list[np.ndarray]:
    from nucli.models.mcf.segnet import predict_p1

    return [predict_p1(net, im.grey.astype(np.float32)).astype(np.float16) for im in images]


# ---------------------------------------------------------------- mask residual
def propose_templates(bank: Any, images: list[Image], p1s: list[np.ndarray], targets: list[np.ndarray],
                      n_max: int, t4: float = T4) -> list[Any]:
    """Missing nuclei from the mask residual ``|T(p1 > t4) - I_nc|`` -> candidate templates, best first.

    A candidate is a segmented nucleus (component of ``p1 > t4``) that no
    confident detected nucleus touches, not on the image border, between half
    the smallest and the largest template diameter, with solidity >= 0.8.
    Candidates are ranked by mean probability x solidity, one per image.
    """
    from scipy import ndimage as ndi

    from nucli.models.mcf.features import prepare
    from nucli.models.mcf.templates import MAX_DIAMETER, MIN_DIAMETER, Template, cut_window

    if n_max <= 0:
        return []
    d_min, d_max = min(bank.diameters), max(bank.diameters)
    a_min, a_max = math.pi / 4 * (0.5 * d_min) ** 2, math.pi / 4 * d_max ** 2
    candidates = []  # (score, image index, cy, cx, diameter)
    for i, (p1, target) in enumerate(zip(p1s, targets)):
        p1 = np.asarray(p1, np.float32)
        seg = p1 > t4
        detected = target == 1
        lab, n = ndi.label(seg)
        if n == 0:
            continue
        touched = np.zeros(n + 1, bool)
        touched[np.unique(lab[detected & seg])] = True
        touched[np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))] = True
        best = None
        for j, sl in enumerate(ndi.find_objects(lab), start=1):
            if sl is None or touched[j]:
                continue
            m = lab[sl] == j
            area = int(m.sum())
            if not (a_min <= area <= a_max):
                continue
            solidity = area / max(_convex_area(m), 1.0)
            if solidity < 0.8:
                continue
            score = float(p1[sl][m].mean()) * solidity
            if best is None or score > best[0]:
                cy, cx = ndi.center_of_mass(m)
                best = (score, i, cy + sl[0].start, cx + sl[1].start, 2.0 * math.sqrt(area / math.pi))
        if best is not None:
            candidates.append(best)
    candidates.sort(key=lambda c: -c[0])
    out = []
    for score, i, cy, cx, d in candidates[:n_max]:
        d = float(np.clip(d, MIN_DIAMETER, MAX_DIAMETER))
        prep = prepare(read_image(images[i].path))
        out.append(Template(cut_window(prep, cy, cx, d), d, f"residual:{images[i].name}@{int(cy)},{int(cx)}"))
    return out


def agreement(bank: Any, images: list[Image], p1s: list[np.ndarray], t4: float = T4) -> float:
    """How well the detection agrees with the segmentation (no labels): an F1 of centres vs segmented nuclei.

    A segmented nucleus (component of ``p1 > t4``) containing a detected
    centre is a hit (one per nucleus); ``F1 = 2 hits / (centres + nuclei)``
    pooled over ``images``.
    """
    from scipy import ndimage as ndi

    from nucli.models.mcf.features import prepare

    hits = n_c = n_s = 0
    for i in sorted(range(len(images)), key=lambda k: images[k].grey.shape):
        centres = bank.detector.detect(prepare(read_image(images[i].path))).centres
        lab, n = ndi.label(np.asarray(p1s[i], np.float32) > t4)
        ids = lab[centres[:, 0], centres[:, 1]] if len(centres) else np.zeros(0, np.int64)
        hits += len(np.unique(ids[ids > 0]))
        n_c += len(centres)
        n_s += n
    return 2.0 * hits / max(n_c + n_s, 1)


def complement_bank(bank: Any, images: list[Image], p1s: list[np.ndarray], targets: list[np.ndarray],
                    n_new: int, t4: float = T4, subset: int = 30, seed: int = 0
                    ) -> tuple[Any, list[Any], dict[str, Any]]:
    """Add up to ``n_new`` residual templates, each kept only if it raises the detection-segmentation agreement.

    The agreement (:func:`agreement`) is measured on ``subset`` training
    images; up to ``2 * n_new`` candidates are tried, best first.
    """
    info: dict[str, Any] = {"tried": [], "accepted": []}
    if n_new <= 0:
        return bank, [], info
    candidates = propose_templates(bank, images, p1s, targets, 2 * n_new, t4)
    if not candidates:
        return bank, [], info
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(images), size=min(subset, len(images)), replace=False))
    sub_images, sub_p1s = [images[i] for i in pick], [p1s[i] for i in pick]
    base = agreement(bank, sub_images, sub_p1s, t4)
    info["agreement_before"] = base
    accepted = []
    for cand in candidates:
        trial = bank.extended([cand])
        score = agreement(trial, sub_images, sub_p1s, t4)
        info["tried"].append({"template": cand.source, "agreement": score})
        if score > base:
            bank, base = trial, score
            accepted.append(cand)
            info["accepted"].append(cand.source)
            if len(accepted) >= n_new:
                break
    info["agreement_after"] = base
    return bank, accepted, info


def _convex_area(mask: np.ndarray) -> float:
    from skimage.morphology import convex_hull_image

    return float(convex_hull_image(mask).sum())


# ---------------------------------------------------------------- metrics (logging only)
def detection_counts(labels: np.ndarray, centres: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN): a centre inside a GT nucleus is a hit; one hit per nucleus, extra centres are FPs."""
    n_true = len(np.unique(labels)) - (1 if (labels == 0).any() else 0)
    c = np.asarray(centres, np.int64).reshape(-1, 2)
    ids = labels[c[:, 0], c[:, 1]] if len(c) else np.zeros(0, np.int64)
    tp = len(np.unique(ids[ids > 0]))
    return tp, len(c) - tp, n_true - tp


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / max(tp + fp, 1)
    r = tp / max(tp + fn, 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12)}


def round_metrics(images: list[Image], dets: list[dict[str, Any]], p1s: list[np.ndarray] | None,
                  limit: int) -> dict[str, Any] | None:
    """Metrics against labels (for the log); None when the images carry no labels."""
    from nucli.metrics import mean_metrics, score_image
    from nucli.models.mcf.method import instances_detection, instances_full

    idx = [i for i, im in enumerate(images) if im.labels is not None][:limit]
    if not idx:
        return None
    tp = fp = fn = 0
    nc_hit = nc_all = bg_hit = bg_all = 0
    inter = union_sum = 0
    full, detonly = [], []
    for i in idx:
        lab, det = images[i].labels, dets[i]
        a, b, c = detection_counts(lab, det["centres"])
        tp, fp, fn = tp + a, fp + b, fn + c
        fg = lab > 0
        t = det["target"]
        nc_hit += int((fg & (t == 1)).sum())
        nc_all += int((t == 1).sum())
        bg_hit += int((~fg & (t == 0)).sum())
        bg_all += int((t == 0).sum())
        detonly.append(score_image(lab, instances_detection(det["response"].astype(np.float32), det["centres"])))
        if p1s is not None:
            pred = np.asarray(p1s[i], np.float32)
            inter += int((fg & (pred > 0.5)).sum())
            union_sum += int(fg.sum() + (pred > 0.5).sum())
            full.append(score_image(lab, instances_full(pred, det["centres"])))
    out: dict[str, Any] = {"images": len(idx), "detection": _prf(tp, fp, fn),
                           "pseudo": {"nucleus_precision": nc_hit / max(nc_all, 1),
                                      "background_precision": bg_hit / max(bg_all, 1),
                                      "confident_fraction": (nc_all + bg_all) / max(
                                          sum(images[i].labels.size for i in idx), 1)}}
    keys = ("aji", "pq", "dice", "f1")
    m = mean_metrics(detonly)
    out["detection_only"] = {k: m[k] for k in keys}
    if p1s is not None:
        out["segmentation_dice"] = 2 * inter / max(union_sum, 1)
        m = mean_metrics(full)
        out["full"] = {k: m[k] for k in keys}
    return out


# ---------------------------------------------------------------- the procedure
def _named(progress: Callable[[str, int, int], None] | None, name: str) -> Callable[[str, int, int], None] | None:
    if progress is None:
        return None
    return lambda _stage, done, total: progress(name, done, total)


def _stage_progress(progress: Callable[[str, int, int], None] | None, name: str
                    ) -> Callable[[int, int, dict[str, float]], None] | None:
    if progress is None:
        return None
    return lambda step, total, _parts: progress(name, step, total)


def _write_round(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=float) + "\n")


def train_mcf(
    templates: list[Any],
    train_dir: Path,
    out_dir: Path,
    weights_out: Path | None = None,
    eval_dir: Path | None = None,
    settings: TrainSettings | None = None,
    resume: bool = False,
    threads: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Train MCF from ``templates`` on the (unlabelled) images of ``train_dir``; see the module docstring.

    Returns a summary (per-round metrics when labels exist, bank size, wall time).
    """
    import torch

    from nucli.models.mcf.bank import Bank
    from nucli.models.mcf.detector import DetectorParams
    from nucli.models.mcf.method import save_mcf_weights
    from nucli.models.mcf.segnet import build_unet
    from nucli.models.weights_io import load_into, load_weights

    s = settings or TrainSettings()
    if not templates:
        raise InputError("MCF needs at least one nucleus template")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(s.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    images = load_images(train_dir, s.limit)
    evals = load_images(eval_dir, None) if eval_dir is not None else []
    log.info("%d training images%s", len(images), f", {len(evals)} evaluation images" if evals else "")

    net = build_unet(s.widths)
    net_params = {"unet": {"widths": [int(w) for w in s.widths]}}
    bank = None
    start = 1
    if resume:
        done = sorted(out_dir.glob("round*.safetensors"), key=lambda p: int(p.stem[5:]) if p.stem[5:].isdigit() else -1)
        done = [p for p in done if p.stem[5:].isdigit()]
        if done:
            tensors, cfg = load_weights(done[-1], "mcf")
            bank = Bank.from_tensors(tensors, cfg["params"]["bank"], str(done[-1]))
            load_into(net, {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}, done[-1], "mcf")
            start = int(done[-1].stem[5:]) + 1
            log.info("resuming after %s (%d templates)", done[-1].name, len(bank.templates))
    if bank is None:
        bank = Bank.build(list(templates), DetectorParams.from_dict(s.detector))
    history = []
    rounds_log = out_dir / "rounds.jsonl"
    for r in range(start, s.rounds + 1):
        t0 = time.time()
        dets = detect_all(bank, images, s, _named(progress, f"round {r} detection"))
        targets = [d["target"] for d in dets]
        synthetic = SyntheticSource(images, targets, seed=s.seed + 1000 * r)
        train_stage(net, images, targets, s, s.steps(s.seg_steps, r), s.lr, out_dir, f"round{r}_seg",
                    s.seed + r, synthetic, resume, _stage_progress(progress, f"round {r} segmentation"))
        p1s = predict_all(net, images)
        from nucli.models.mcf.confidence import self_target

        self_targets = [self_target(p.astype(np.float32), s.t2, s.t3) for p in p1s]
        train_stage(net, images, self_targets, s, s.steps(s.self_steps, r), s.self_lr, out_dir, f"round{r}_self",
                    s.seed + 100 + r, None, resume, _stage_progress(progress, f"round {r} self-finetuning"))
        p1s = predict_all(net, images)
        record: dict[str, Any] = {"round": r, "templates": len(bank.templates)}
        m = round_metrics(images, dets, p1s, s.metrics_limit)
        if m is not None:
            record["train"] = m
        if evals:
            edets = detect_all(bank, evals, s)
            record["eval"] = round_metrics(evals, edets, predict_all(net, evals), len(evals))
        bank, new, info = complement_bank(bank, images, p1s, targets, s.new_templates if r < s.rounds else 0,
                                          s.t4, seed=s.seed + r)
        record["new_templates"] = [t.source for t in new]
        record["complementing"] = info
        record["wall_s"] = round(time.time() - t0, 1)
        _write_round(rounds_log, record)
        history.append(record)
        log.info("round %d: %s", r, json.dumps({k: v for k, v in record.items()
                                                 if k not in ("new_templates", "complementing")},
                                                default=lambda x: round(float(x), 4)))
        # the U-Net after round r with the bank for round r + 1 (what a resumed run continues from)
        save_mcf_weights(out_dir / f"round{r}.safetensors", bank, net, params=net_params)
    summary = {"rounds": history, "templates": len(bank.templates), "wall_s": round(time.time() - t_start, 1),
               "settings": asdict(s)}
    if weights_out is not None:
        extra = {"nucli.train.rounds": str(s.rounds), "nucli.train.templates": str(len(bank.templates)),
                 "nucli.train.images": str(len(images))}
        save_mcf_weights(Path(weights_out), bank, net, params=net_params, extra=extra)
        summary["weights"] = str(weights_out)
    return summary
