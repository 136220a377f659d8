"""The embedded demo: a small pyramidal slide made from real tissue, segmented end to end.

No download is needed. The tissue is scikit-image's bundled immunohistochemistry
image (``skimage.data.immunohistochemistry()``: 512 x 512 px of human colon,
a protein stained brown with DAB, nuclei counterstained blue with hematoxylin;
the file ships inside the scikit-image wheel).

Stain: by default (``stain="hematoxylin"``) the demo uses the hematoxylin
component of the image: colour deconvolution (Ruifrok & Johnston stain vectors,
``skimage.color.rgb2hed``) separates the stains, the DAB and residual components
are set to zero, and the image is recomposed (``hed2rgb``). The brown DAB stain
is dark like nuclei in gray scale, and the shipped methods were trained on
nucleus stains only, so the full IHC colours would show them a problem they were
not made for. ``stain="ihc"`` keeps the image exactly as shipped.

:func:`write_demo_slide` places the tissue on a glass margin and streams it into
a tiled, pyramidal Aperio-style TIFF (levels 1, 2, 4; a thumbnail and a small
associated ``label`` image) with nucli's synthetic-slide writer. The image comes
without a pixel size; the demo slide states **0.5 µm/px (assumed)**: its
epithelial nuclei are then about 10 x 5 µm, a plausible size, and it is the
working pixel size of the shipped methods, so the method sees the pixels as they are.

:func:`run_demo` then runs ``nucli segment`` on it with the chosen method
(default: the default method) and writes, under the output folder::

    slide.svs                      the demo slide (made once, reused)
    <method>/nuclei.geojson        every nucleus, QuPath detections (level-0 px)
    <method>/nuclei.csv            one row of measurements per nucleus
    <method>/overlay.png           the slide with every nucleus outlined
    <method>/nuclei.nucli.zarr     the run store (tiles, per-tile labels)

Other variants get their own names (``slide-ihc-crop256.svs``,
``<method>-ihc-crop256/``), so they never mix with the default one.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from nucli.errors import InputError, WeightsError

log = logging.getLogger("nucli.demo")

DEMO_MPP = 0.5
"""Pixel size stated for the demo slide (µm/px). Assumed: the source image has none."""
MARGIN = 96
"""Glass around the tissue, px (so the tissue mask has something to leave out)."""
GLASS = (242, 242, 240)
STAINS = ("hematoxylin", "ihc")


@lru_cache(maxsize=1)
def _ihc() -> np.ndarray:
    try:
        import skimage.data
    except ImportError:  # pragma: no cover - scikit-image is a dependency
        raise InputError("the demo needs scikit-image (`pip install scikit-image`)") from None
    try:
        img = np.asarray(skimage.data.immunohistochemistry())
    except Exception as exc:  # noqa: BLE001 - a broken install of the data file
        raise InputError(f"scikit-image's bundled IHC image cannot be read ({type(exc).__name__}: {exc}); "
                         "reinstall scikit-image") from None
    if img.ndim != 3 or img.shape[2] < 3 or img.dtype != np.uint8:
        raise InputError(f"scikit-image's IHC image has an unexpected form {img.shape} {img.dtype}")
    return np.ascontiguousarray(img[..., :3])


def demo_tissue(stain: str = "hematoxylin") -> np.ndarray:
    """The bundled IHC image, (512, 512, 3) uint8 RGB, as shipped (``"ihc"``) or its hematoxylin
    component (``"hematoxylin"``, see module docstring). Read from the scikit-image wheel, never downloaded."""
    if stain not in STAINS:
        from nucli.errors import UsageError

        raise UsageError(f"unknown demo stain '{stain}'; choose one of: {', '.join(STAINS)}")
    img = _ihc()
    if stain == "ihc":
        return img.copy()
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(img)
    hed[..., 1:] = 0.0
    return np.clip(np.round(hed2rgb(hed) * 255.0), 0, 255).astype(np.uint8)


def demo_canvas(crop: int | None = None, margin: int = MARGIN, stain: str = "hematoxylin") -> np.ndarray:
    """Level 0 of the demo slide: the tissue (or its central ``crop`` x ``crop`` px) on a glass margin."""
    tissue = demo_tissue(stain)
    if crop is not None:
        crop = int(crop)
        if not 16 <= crop <= tissue.shape[0]:
            raise ValueError(f"crop must be in [16, {tissue.shape[0]}], got {crop}")
        o = (tissue.shape[0] - crop) // 2
        tissue = tissue[o:o + crop, o:o + crop]
    h, w = tissue.shape[:2]
    canvas = np.empty((h + 2 * margin, w + 2 * margin, 3), np.uint8)
    canvas[:] = GLASS
    canvas[margin:margin + h, margin:margin + w] = tissue
    return canvas


class _CanvasRender:
    """``render(x, y, w, h, downsample)`` over an in-memory canvas, for the pyramid writer."""

    def __init__(self, canvas: np.ndarray):
        self.canvas = canvas
        self._levels: dict[float, np.ndarray] = {1.0: canvas}

    def _level(self, d: float) -> np.ndarray:
        if d not in self._levels:
            from skimage.transform import resize

            h, w = self.canvas.shape[:2]
            n = round(d)
            if n >= 2 and abs(d - n) < 1e-9 and h % n == 0 and w % n == 0:
                small = self.canvas.reshape(h // n, n, w // n, n, 3).mean(axis=(1, 3))
            else:
                shape = (max(1, math.ceil(h / d)), max(1, math.ceil(w / d)))
                small = resize(self.canvas, shape, order=1, anti_aliasing=True, preserve_range=True)
            self._levels[d] = np.clip(np.round(small), 0, 255).astype(np.uint8)
        return self._levels[d]

    def __call__(self, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        lvl = self._level(float(downsample))
        out = np.empty((h, w, 3), np.uint8)
        out[:] = GLASS
        part = lvl[y:y + h, x:x + w]
        out[:part.shape[0], :part.shape[1]] = part
        return out


def write_demo_slide(path: str | Path, *, crop: int | None = None, stain: str = "hematoxylin") -> Path:
    """Write the demo slide (pyramidal Aperio-style TIFF, 0.5 µm/px, JPEG tiles) to ``path`` atomically.

    ``crop`` keeps only the central ``crop`` x ``crop`` px of the tissue (a tiny slide for tests).
    """
    from nucli.synthetic import write_pyramidal_tiff

    canvas = demo_canvas(crop, stain=stain)
    render = _CanvasRender(canvas)
    h, w = canvas.shape[:2]
    label = render(0, 0, max(1, w // 8), max(1, h // 8), 8.0)  # a small view, where a slide has its label
    return write_pyramidal_tiff(path, render, w, h, mpp=DEMO_MPP, tile=128, compression="jpeg", quality=92,
                                levels=3, level_factor=2, thumbnail=256, associated={"label": label},
                                magnification=20.0)


def _check_method(method: str | None, weights: Path | None) -> str:
    """The method's name; a one-line error (with the way out) when its weights are not installed."""
    from nucli.models.registry import get_spec

    spec = get_spec(method)
    if weights is None and spec.needs_weights and spec.weights_path is not None and not spec.weights_path.exists():
        raise WeightsError(
            f"method '{spec.name}' has no shipped weights in this install ({spec.weights_path.name} is missing); "
            "run the demo with `nucli demo --method watershed`, or pass --weights"
        )
    return spec.name


def variant(stain: str = "hematoxylin", crop: int | None = None) -> str:
    """Name suffix of a demo variant: "" for the default one, e.g. "-ihc-crop256" otherwise."""
    return ("" if stain == "hematoxylin" else f"-{stain}") + ("" if crop is None else f"-crop{int(crop)}")


def demo_outputs(out_dir: Path, method: str, stain: str = "hematoxylin", crop: int | None = None,
                 objects: Any = None) -> dict[str, Path]:
    """Where the demo writes: the slide, and the outputs of ``method`` on it (``-cells``/``-dab`` when
    ``objects`` asks for cells or positivity, so they never mix with plain nuclei)."""
    v = variant(stain, crop)
    extra = ""
    if objects is not None:
        extra = ("-cells" if objects.cells else "") + ("-dab" if objects.positivity is not None else "")
    d = Path(out_dir) / f"{method}{v}{extra}"
    return {"slide": Path(out_dir) / f"slide{v}.svs", "geojson": d / "nuclei.geojson", "csv": d / "nuclei.csv",
            "overlay": d / "overlay.png", "store": d / "nuclei.nucli.zarr"}


def run_demo(
    out_dir: str | Path = "nucli-demo",
    *,
    method: str | None = None,
    weights: Path | None = None,
    crop: int | None = None,
    stain: str = "hematoxylin",
    overwrite: bool = False,
    progress: bool = True,
    device: Any = "cpu",
    objects: Any = None,
) -> dict[str, Any]:
    """Make the demo slide (once) and segment it; returns the summary (``status``: ``done`` or ``exists``).

    ``device``: where the model runs (``auto|cpu|cuda|cuda:N|mps``).

    When every output of this method is already there and ``overwrite`` is
    false, nothing is recomputed or replaced: the summary says ``exists``.
    """
    import time

    from nucli.pipeline import segment_to_outputs

    from nucli.parallel.device import resolve_device

    start = time.perf_counter()
    dev = resolve_device(device)  # a device this machine lacks: one line, before anything is made
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; pass -o with a folder for the demo outputs")
    if stain not in STAINS:
        from nucli.errors import UsageError

        raise UsageError(f"unknown --stain '{stain}'; choose one of: {', '.join(STAINS)}")
    name = _check_method(method, weights)
    files = demo_outputs(out_dir, name, stain, crop, objects)
    slide = files["slide"]
    targets = [files["geojson"], files["csv"], files["overlay"]]
    if not overwrite and slide.exists() and all(p.exists() for p in targets):
        return {"status": "exists", "method": name, "slide": str(slide), "geojson": str(files["geojson"]),
                "measurements": str(files["csv"]), "overlay": str(files["overlay"]),
                "note": "outputs already there; pass --overwrite to redo them"}
    files["geojson"].parent.mkdir(parents=True, exist_ok=True)
    made_slide = False
    if overwrite or not slide.exists():
        write_demo_slide(slide, crop=crop, stain=stain)
        made_slide = True
    summary = segment_to_outputs(slide, files["geojson"], method=name, weights=weights, formats=["csv"],
                                 overlay=files["overlay"], store=files["store"], overwrite=overwrite,
                                 progress=progress, device=dev, objects=objects)
    return {
        "status": "done",
        "method": name,
        "slide": str(slide),
        "slide_made": made_slide,
        "stain": stain,
        "slide_mpp": DEMO_MPP,
        "nuclei": summary.get("nuclei"),
        "tiles": summary.get("tiles"),
        "tissue_area_mm2": summary.get("tissue_area_mm2"),
        "density_per_mm2": summary.get("density_per_mm2"),
        "geojson": str(files["geojson"]),
        "measurements": str(files["csv"]),
        "overlay": str(files["overlay"]),
        "store": str(files["store"]),
        **{k: v for k, v in summary.items() if k in _OBJECT_KEYS},
        **dev.record(),
        "seconds": round(time.perf_counter() - start, 2),
    }


_OBJECT_KEYS = ("objects", "cell_expansion_um", "cells", "positivity", "positivity_thresholds", "positive", "negative",
                "1+", "2+", "3+", "positive_percent", "h_score")


def readme_picture(overlay: str | Path, dest: str | Path, *, box: tuple[int, int, int, int] | None = None,
                   colors: int = 48, slide_width: int = 512 + 2 * MARGIN) -> Path:
    """A small PNG for the README from a demo overlay: cropped to ``box`` (x0, y0, x1, y1;
    default the tissue, without the glass margin: the overlay is drawn at the method's working
    pixel size, so the margin of a ``slide_width`` px slide is scaled to the overlay's width) and
    reduced to a ``colors``-colour palette in which the outline colour is kept exact."""
    from PIL import Image

    from nucli.export.overlay import CONTOUR_RGB

    img = Image.open(overlay).convert("RGB")
    if box is None:
        m = int(round(MARGIN * img.width / float(slide_width)))
        box = (m, m, img.width - m, img.height - m)
    img = img.crop(box)
    outline = np.all(np.asarray(img) == np.array(CONTOUR_RGB, np.uint8), axis=2)
    q = img.quantize(colors=colors - 1, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    index = np.asarray(q).copy()
    palette = (q.getpalette() or [])[: 3 * (colors - 1)]
    palette += [0] * (3 * (colors - 1) - len(palette)) + list(CONTOUR_RGB)
    index[outline] = colors - 1
    small = Image.fromarray(index.astype(np.uint8), mode="P")
    small.putpalette(palette)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    small.save(tmp, format="PNG", optimize=True)
    tmp.replace(dest)
    return dest


__all__ = ["DEMO_MPP", "STAINS", "variant", "demo_tissue", "demo_canvas", "write_demo_slide", "run_demo", "demo_outputs",
           "readme_picture"]
