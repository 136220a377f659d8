"""Scale from the nuclei themselves, for images without a pixel size (``--mpp auto``).

Plain PNG/TIFF/JPEG microscopy images often carry no pixel size, and nuclei in
them range from a few pixels to 60 px across. The networks were trained at the
native resolution of DSB2018 (median nucleus 19 px) and separate small,
touching nuclei poorly: the 4-px edge band leaves an 8-px nucleus almost no
body. ``auto`` therefore segments the image (or a few tiles of a slide) once at
its own resolution, takes the median equivalent diameter of the nuclei found,
and enlarges the image when that median is below a ratio times the method's
typical nucleus diameter (``nucleus_diameter_px``). The zoom is the ratio,
snapped to the nearest of :data:`LADDER` on a log scale. Weights trained at one
working scale (their config holds ``params.auto_scale``, see
:mod:`nucli.training.multiset`) search the zoom instead (:func:`scan_zoom`), shrinking
(:data:`SHRINK_LADDER`) as well as enlarging, and get ``auto`` by default for inputs without a
pixel size (:func:`resolve_mode`). Older weights never shrink: on DSB2018 val, shrinking lost
them more than it won.

The ratio is the method's own, chosen on ``dsb2018/val`` only with its shipped
weights (``benchmarks/autoscale_rule.py`` reruns the choice), and adopted only
when it raises val (AJI + PQ)/2 by at least 0.005. A method without one in
:data:`AUTO_RATIOS` is never enlarged: ``auto`` then keeps the native resolution.
GeNSeg-Net: 1.6 (+0.015). HARU-Net: every ratio lowered val (best -0.0015, at 0.8);
watershed: best +0.002 (ratio 1.0), below the bar; MCF and spatialprior were not tried.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger("nucli.autoscale")

AUTO = "auto"
#: ``--mpp native``: an image without a pixel size is segmented at its own resolution, never probed
NATIVE = "native"
#: zoom factors the rule may pick (working px per input px)
LADDER = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
#: weights trained at one working scale (``params.auto_scale`` in their config) may also be shrunk
SHRINK_LADDER = (0.25, 0.35, 0.5, 0.6, 0.7, 0.85)
#: per method: enlarge until the median nucleus is about ratio * nucleus_diameter_px across
AUTO_RATIOS: dict[str, float] = {"gensegnet": 1.6}
#: fewer nuclei than this in the first pass: keep the image as it is
MIN_NUCLEI = 5
#: :func:`scan_zoom` steps one zoom up from its pick when the nuclei there are still whole: their
#: median diameter grew by at least (zoom ratio) ** STEP_UP_GROWTH and there are at most
#: STEP_UP_COUNT_RATIO times as many (+ 2). Chosen on the train splits of dsb2018 and
#: bitdepth_nucseg (mean AJI +0.006 / +0.009 for gensegnet), not on val.
STEP_UP_GROWTH = 0.5
STEP_UP_COUNT_RATIO = 1.1
#: :func:`scan_zoom` rejects a pick when, one zoom up, the median nucleus found is below this
#: fraction of the pick's: the objects it took for nuclei were not (whole cells of a smear at a
#: tiny zoom, clusters of dim nuclei merged into blobs). Chosen on the same train splits
#: (dsb2018 train 0.718 -> 0.737 AJI, bitdepth_nucseg train unchanged).
REJECT_SHRINK = 0.6
#: below this zoom the reject test also looks two zooms up: the whole cells of a smear shrink
#: into nuclei over two steps of the ladder at tiny zooms (0.25 -> 0.5), and those passes are cheap
REJECT_TWO_AHEAD_BELOW = 1.0


@dataclass(frozen=True)
class ScaleEstimate:
    """The outcome of the first pass: the zoom to use, and what it was based on."""

    zoom: float
    median_diameter_px: float | None
    n_nuclei: int
    reference_px: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "zoom": self.zoom,
            "median_diameter_px": None if self.median_diameter_px is None else round(self.median_diameter_px, 2),
            "n_nuclei": self.n_nuclei,
            "reference_px": round(self.reference_px, 2),
        }


def diameters(labels: np.ndarray) -> np.ndarray:
    """Equivalent diameters (px) of the instances of a label image."""
    areas = np.bincount(np.asarray(labels).ravel())[1:]
    areas = areas[areas > 0]
    return np.sqrt(4.0 * areas / math.pi)


def zoom_for(median_diameter: float | None, n_nuclei: int, reference_px: float, shrink: bool = False) -> float:
    """The rule: zoom = reference / median diameter, snapped to :data:`LADDER` (and, with
    ``shrink``, :data:`SHRINK_LADDER`); without ``shrink`` never below 1."""
    if median_diameter is None or n_nuclei < MIN_NUCLEI or median_diameter <= 0:
        return 1.0
    want = reference_px / median_diameter
    ladder = SHRINK_LADDER + LADDER if shrink else LADDER
    if not shrink:
        want = max(1.0, want)
    return min(ladder, key=lambda z: abs(math.log(z) - math.log(want)))


def _own_rule(config: Any) -> dict[str, Any] | None:
    rule = (getattr(config, "params", None) or {}).get("auto_scale")
    return rule if isinstance(rule, dict) else None


def ratio_for(config: Any) -> float | None:
    """The method's auto-zoom ratio, or None (never rescaled).

    Weights trained at one working scale carry their own rule (``params.auto_scale``:
    ratio 1, i.e. bring the median nucleus to the training reference size, enlarging or
    shrinking); older weights use :data:`AUTO_RATIOS` (enlarge only).
    """
    rule = _own_rule(config)
    if rule is not None:
        try:
            return float(rule.get("ratio", 1.0))
        except (TypeError, ValueError):
            return None
    return AUTO_RATIOS.get(getattr(config, "name", ""))


def shrinks(config: Any) -> bool:
    rule = _own_rule(config)
    return bool(rule and rule.get("shrink", True))


def estimate(label_images: Iterable[np.ndarray], nucleus_diameter_px: float, ratio: float,
             shrink: bool = False) -> ScaleEstimate:
    """Zoom from first-pass label images (at the input's own resolution)."""
    d = [diameters(lab) for lab in label_images]
    all_d = np.concatenate(d) if d else np.zeros(0)
    med = float(np.median(all_d)) if all_d.size else None
    ref = float(ratio) * float(nucleus_diameter_px)
    return ScaleEstimate(zoom_for(med, int(all_d.size), ref, shrink), med, int(all_d.size), ref)


def estimate_for(config: Any, label_images: Iterable[np.ndarray]) -> ScaleEstimate | None:
    """:func:`estimate` with the method's own ratio; None for a method without one."""
    ratio = ratio_for(config)
    return None if ratio is None else estimate(label_images, config.nucleus_diameter_px, ratio, shrinks(config))


def resize_rgb(rgb: np.ndarray, zoom: float) -> np.ndarray:
    """(H, W, 3) uint8 resized ``zoom`` times (bilinear; anti-aliased when shrinking)."""
    from skimage.transform import resize

    h, w = rgb.shape[:2]
    out = resize(rgb, (max(1, round(h * zoom)), max(1, round(w * zoom))), order=1, anti_aliasing=zoom < 1,
                 preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def shrink_labels(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Labels of an enlarged image back to ``shape`` (nearest neighbour, as ``segment_array``), ids 1..n.

    A nucleus can vanish when shrunk; the ids are then renumbered.
    """
    from nucli.api import _resize_labels
    from nucli.postprocess import relabel_sequential

    out = _resize_labels(np.asarray(labels), (int(shape[0]), int(shape[1])))
    ids = np.unique(out)
    if ids[-1] != ids.size - (ids[0] == 0):
        out = relabel_sequential(out)
    return out.astype(np.int32, copy=False)


def scans(config: Any) -> bool:
    """Weights trained at one working scale search the zoom (:func:`scan_zoom`); older ones estimate it once."""
    rule = _own_rule(config)
    return bool(rule and rule.get("shrink", True) and rule.get("search", "ascending") == "ascending")


def scan_zoom(segment_at: Callable[[float], list[np.ndarray]], nucleus_diameter_px: float,
              ratio: float = 1.0, step_up: bool = True, reject: bool = True
              ) -> tuple[ScaleEstimate, float, list[np.ndarray]]:
    """The zoom at which the network finds whole nuclei at least as large as those it was trained on.

    A network trained on nuclei of one size (``nucleus_diameter_px``) cuts nuclei that are much
    larger into pieces of about that size, so one pass at the native size cannot see that they are
    large. Nuclei shown too small, on the other hand, come out at their own size. So the zoom is
    searched upwards through :data:`SHRINK_LADDER` + :data:`LADDER`: the first zoom whose found
    nuclei have a median diameter (working px) of at least ``ratio * nucleus_diameter_px`` wins
    (none: the zoom whose median came closest). ``segment_at(z)`` segments the probe images
    ``z`` times their size. Returns the estimate, the zoom, and the label images at that zoom.

    The next zoom up is looked at too. With ``reject``, a pick whose objects shrink to less than
    :data:`REJECT_SHRINK` of their median there is not taken and the search goes on: whole cells of
    a cytology smear at a tiny zoom, or dim nuclei merged into blobs, look like nuclei of the
    reference size, but one zoom up the real nuclei appear, much smaller. (A network that cuts
    large nuclei into pieces finds pieces of about its own size, so those do not shrink that far.)
    With ``step_up`` the next zoom is taken when its nuclei are still whole (:func:`_whole`):
    nuclei that are shown larger but not yet cut into pieces are outlined more finely, so the first
    zoom that reaches the reference size is often one step too small.
    The cost is the passes up to one above the pick: about 4 native passes for a pick of 1.
    """
    ref = float(ratio) * float(nucleus_diameter_px)
    best: tuple[float, float, ScaleEstimate, list[np.ndarray]] | None = None
    done: dict[float, tuple[list[np.ndarray], np.ndarray]] = {}

    def at(z: float) -> tuple[list[np.ndarray], np.ndarray]:
        if z not in done:
            labels = [np.asarray(v) for v in segment_at(z)]
            done[z] = labels, (np.concatenate([diameters(v) for v in labels]) if labels else np.zeros(0))
        return done[z]

    ladder = sorted(set(SHRINK_LADDER + LADDER))
    for i, z in enumerate(ladder):
        labels, d = at(z)
        if d.size < MIN_NUCLEI:
            continue
        med = float(np.median(d))
        est = ScaleEstimate(z, med / z, int(d.size), ref)
        gap = abs(math.log(med / ref))
        if med >= ref:
            if i + 1 == len(ladder) or not (step_up or reject):
                return est, z, labels
            z2 = ladder[i + 1]
            labels2, d2 = at(z2)
            med2 = float(np.median(d2)) if d2.size else 0.0
            shrunk = d2.size >= MIN_NUCLEI and med2 < REJECT_SHRINK * med
            if reject and not shrunk and z < REJECT_TWO_AHEAD_BELOW and i + 2 < len(ladder):
                _, d3 = at(ladder[i + 2])
                shrunk = d3.size >= MIN_NUCLEI and float(np.median(d3)) < REJECT_SHRINK * med
            if reject and shrunk:
                if best is None or gap < best[0]:
                    best = (gap, z, est, labels)
                continue  # not nuclei: search on
            if step_up and _whole(z, med, int(d.size), z2, med2, int(d2.size)):
                return ScaleEstimate(z2, med2 / z2, int(d2.size), ref), z2, labels2
            return est, z, labels
        if best is None or gap < best[0]:
            best = (gap, z, est, labels)
    if best is None:
        return ScaleEstimate(1.0, None, 0, ref), 1.0, []
    return best[2], best[1], best[3]


def _whole(z: float, med: float, n: int, z2: float, med2: float, n2: int) -> bool:
    """Whether the nuclei found at zoom ``z2`` (> ``z``) are still whole: at least
    :data:`MIN_NUCLEI`, no more than :data:`STEP_UP_COUNT_RATIO` times as many as at ``z`` (+ 2;
    more means nuclei were cut into pieces), and a median diameter grown by at least
    (zoom ratio) ** :data:`STEP_UP_GROWTH` (a network cutting nuclei finds pieces of its own size,
    whatever the zoom)."""
    if n2 < MIN_NUCLEI or n2 > STEP_UP_COUNT_RATIO * n + 2:
        return False
    return med2 >= med * (z2 / z) ** STEP_UP_GROWTH


def auto_by_default(config: Any) -> bool:
    """Whether an input without a pixel size gets ``--mpp auto`` when ``--mpp`` is not given: for
    weights trained at one working scale (they search the zoom), whose val scores rose with it."""
    return scans(config)


def resolve_mode(mpp: Any, config: Any) -> Any:
    """``--mpp`` as given (a number, ``auto``, ``native`` or None) -> a number, ``auto`` or None (native)."""
    if mpp == NATIVE:
        return None
    if mpp is None and config is not None and auto_by_default(config):
        return AUTO
    return mpp


def choose_zoom(config: Any, segment_at: Callable[[float], list[np.ndarray]]
                ) -> tuple[ScaleEstimate | None, list[np.ndarray] | None]:
    """``--mpp auto`` for a method: (estimate or None without a rule, the label images at the chosen zoom
    when they were computed on the way, else None)."""
    ratio = ratio_for(config)
    if ratio is None:
        return None, None
    if scans(config):
        est, z, labels = scan_zoom(segment_at, config.nucleus_diameter_px, ratio)
        return est, labels
    first = segment_at(1.0)
    est = estimate_for(config, first)
    return est, (first if est is not None and est.zoom == 1.0 else None)


class Zoomed:
    """One image segmented ``zoom`` times its size: :meth:`working` gives the labels at that size,
    :meth:`native` those at the image's own size.

    A method that can post-process at another resolution (``Method.postprocess_resampled``)
    traces the outlines on its maps resampled to the image's pixels; any other has its labels
    resized nearest-neighbour (:func:`shrink_labels`). The network runs once either way.
    """

    def __init__(self, method: Any, rgb: np.ndarray, zoom: float):
        from nucli.models.base import Method

        self.rgb, self.zoom, self._method = rgb, float(zoom), method
        self._native: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._work = rgb if self.zoom == 1.0 else resize_rgb(rgb, self.zoom)
        own = getattr(type(method), "postprocess_resampled", Method.postprocess_resampled) \
            is not Method.postprocess_resampled
        self._raw = method.infer(self._work[None]) if self.zoom != 1.0 and own else None

    def working(self) -> np.ndarray:
        if self._labels is None:
            m, batch = self._method, self._work[None]
            out = m.segment(batch) if self._raw is None else m.postprocess_tiles(self._raw, batch)
            self._labels = np.asarray(out[0].labels)
        return self._labels

    def native(self) -> np.ndarray:
        if self._native is None:
            if self.zoom == 1.0:
                self._native = self.working()
            elif self._raw is not None:
                self._native = np.asarray(self._method.postprocess_resampled(self._raw, self.rgb), np.int32)
            else:
                self._native = shrink_labels(self.working(), self.rgb.shape[:2])
        return self._native


def segment_image_auto(method: Any, rgb: np.ndarray) -> tuple[np.ndarray, ScaleEstimate | None]:
    """Segment one whole (H, W, 3) image at the zoom its own nuclei call for (:func:`choose_zoom`).

    A method without a rule runs once at the image's own resolution (the estimate is then None).
    The labels come back at the image's own size (:class:`Zoomed`).
    """
    tried: dict[float, Zoomed] = {}

    def zoomed(z: float) -> Zoomed:
        if z not in tried:
            tried[z] = Zoomed(method, rgb, z)
        return tried[z]

    def at(z: float) -> list[np.ndarray]:
        return [zoomed(z).working()]

    est = choose_zoom(method.config, at)[0]  # its label images are those of ``tried``
    if est is None:
        return zoomed(1.0).working(), None
    if est.zoom != 1.0:
        log.debug("auto scale: median nucleus %.1f px -> zoom %.2f", est.median_diameter_px or 0.0, est.zoom)
    return zoomed(est.zoom).native(), est


def parse_mpp(value: Any) -> float | str | None:
    """``--mpp``: a positive number of µm per px, or ``auto``."""
    from nucli.errors import UsageError

    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if text == NATIVE:
        return NATIVE
    try:
        number = float(text)
    except ValueError:
        raise UsageError(f"--mpp must be a pixel size in µm/px, 'auto' or 'native', got '{value}'") from None
    if not (math.isfinite(number) and number > 0):
        raise UsageError(f"--mpp must be a positive number of µm per pixel, got {value}")
    return number
