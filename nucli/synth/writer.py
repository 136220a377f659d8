"""Write synthetic image/label pairs: OUT/images/synth_NNNNN.png + OUT/labels/synth_NNNNN.tif.

Each pair is drawn from its own random stream (``seed``, index), so a rerun
writes the same pairs and an interrupted run resumes: pairs already on disk
are kept unless ``overwrite``. Files are written atomically. The output has
the layout of ``nucli train --data`` and ``nucli evaluate --dataset``.
With ``refiner`` (a ``synth_refiner.safetensors`` written by the synthesis
training) each pre-synthesised image is restyled by AdaIN with a real image of
the same kind as style.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nucli.errors import InputError, OutputExistsError, UsageError

log = logging.getLogger("nucli.synth")


def _write_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(img).save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def refine(refiner: Any, content: np.ndarray, style: np.ndarray) -> np.ndarray:
    """AdaIN-refine one uint8 RGB image with a real style image (any sizes); returns uint8 RGB."""
    import torch
    import torch.nn.functional as F

    from nucli.models.gensegnet.generator import pad_to

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32) / 255.0)[None]

    c, (h, w) = pad_to(t(content), refiner.stride)
    s, _ = pad_to(t(style), refiner.stride)
    with torch.inference_mode():
        out = refiner(c, s)[0, :, :h, :w]
    out = F.relu(out).clamp(0, 1).numpy().transpose(1, 2, 0)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def write_synthetic_pairs(data_dir: Path, out_dir: Path, count: int, seed: int = 0,
                          refiner_weights: Path | None = None, overwrite: bool = False,
                          limit: int | None = None,
                          progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write ``count`` synthetic pairs made from the labelled images of ``data_dir``."""
    from nucli.evaluation.labels_io import write_labels_tif
    from nucli.synth.adversarial import load_refiner, load_rgb_pairs
    from nucli.synth.compose import image_kind, pre_synthesize

    if count < 1:
        raise UsageError(f"--count must be at least 1, not {count}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"-o {out_dir} exists and is not a folder")
    if Path(data_dir).resolve() == out_dir.resolve():
        raise UsageError("-o must differ from --data (inputs are never modified)")
    pairs = load_rgb_pairs(data_dir, limit)
    refiner = load_refiner(refiner_weights) if refiner_weights is not None else None
    by_kind: dict[str, list[int]] = {}
    for i, (_, img, _) in enumerate(pairs):
        by_kind.setdefault(image_kind(img), []).append(i)
    img_dir, lab_dir = out_dir / "images", out_dir / "labels"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    written = kept = 0
    for i in range(count):
        name = f"synth_{i:05d}"
        ip, lp = img_dir / f"{name}.png", lab_dir / f"{name}.tif"
        if ip.exists() and lp.exists() and not overwrite:
            kept += 1
        else:
            rng = np.random.default_rng([seed, i])
            src = int(rng.integers(len(pairs)))
            _, img, lab = pairs[src]
            content, labels = pre_synthesize(img, lab, rng)
            if refiner is not None:
                same = by_kind[image_kind(img)]
                content = refine(refiner, content, pairs[same[int(rng.integers(len(same)))]][1])
            write_labels_tif(labels, lp)
            _write_png(content, ip)  # the image last: a pair counts as done when both exist
            written += 1
        if progress is not None:
            progress(i + 1, count)
    if kept and overwrite is False:
        log.info("kept %d pairs already in %s", kept, out_dir)
    return {"output": str(out_dir), "written": written, "kept": kept, "count": count,
            "refined": refiner is not None}


def check_output(out_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty output folder that is not a previous synth output, unless --overwrite."""
    out_dir = Path(out_dir)
    if not out_dir.exists() or overwrite:
        return
    foreign = [p.name for p in out_dir.iterdir() if p.name not in ("images", "labels")]
    if foreign and not resume:
        raise OutputExistsError(f"{out_dir} holds other files ({', '.join(sorted(foreign)[:3])}); "
                                "pick an empty folder or pass --overwrite")
