"""IHC positivity: each nucleus classed by its mean DAB optical density, the way QuPath's
*Positive cell detection* does it.

* One threshold (default 0.2 OD, QuPath's default): ``Positive`` when the
  nucleus' mean DAB OD is >= the threshold, else ``Negative``.
* Three increasing thresholds: ``3+`` (>= the third), ``2+`` (>= the second),
  ``1+`` (>= the first), else ``Negative``; the H-score is
  ``1 * %1+ + 2 * %2+ + 3 * %3+`` (0-300).

Class names and colours are QuPath's own (``PathClass``), so QuPath shows them
as it shows its own results. DAB OD is colour deconvolution with the Ruifrok &
Johnston hematoxylin-DAB vectors (``skimage.color.hed_from_rgb``) applied to
optical density in decadic units (``-log10(I / 255)`` per channel), the units of
QuPath's ``DAB OD`` measurements and thresholds.

DAB positivity is refused on fluorescence and on H&E (:func:`stain_problem`):
the Ruifrok vectors read eosin as a mixture with DAB (median "DAB" OD 0.23 on
the H&E CMU slide), so a DAB class there would be noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from nucli.errors import UsageError

POSITIVE, NEGATIVE, ONE_PLUS, TWO_PLUS, THREE_PLUS = "Positive", "Negative", "1+", "2+", "3+"
# QuPath's PathClass colours for its standard classes
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    POSITIVE: (200, 50, 50),
    NEGATIVE: (90, 90, 180),
    ONE_PLUS: (255, 215, 0),
    TWO_PLUS: (225, 150, 50),
    THREE_PLUS: (200, 50, 50),
}
DEFAULT_THRESHOLD = 0.2
EOSIN_P90_MAX = 0.03
"""H&E check: the 90th percentile of the eosin component over tissue pixels, OD. Measured: H&E
(CMU slide, 6 MoNuSeg tiles) 0.054-0.30; hematoxylin-DAB (the demo's IHC image) -0.023; hematoxylin
alone 0.001."""


def dab_od(rgb: np.ndarray) -> np.ndarray:
    """DAB optical density (decadic units, >= 0) of an RGB uint8 image, (H, W) float32."""
    from skimage.color import hed_from_rgb

    rgb = np.asarray(rgb)[..., :3].astype(np.float32)
    od = -np.log10(np.clip(rgb, 1.0, 255.0) / 255.0)
    return np.clip(od @ hed_from_rgb[:, 2].astype(np.float32), 0.0, None)


def eosin_od(rgb: np.ndarray) -> np.ndarray:
    """Eosin component (decadic OD, may be negative) by the same deconvolution."""
    from skimage.color import hed_from_rgb

    rgb = np.asarray(rgb)[..., :3].astype(np.float32)
    od = -np.log10(np.clip(rgb, 1.0, 255.0) / 255.0)
    return od @ hed_from_rgb[:, 1].astype(np.float32)


@dataclass(frozen=True)
class Positivity:
    """``--positivity dab`` with one threshold (Positive/Negative) or three (1+/2+/3+)."""

    thresholds: tuple[float, ...] = (DEFAULT_THRESHOLD,)

    @property
    def intensity_classes(self) -> bool:
        return len(self.thresholds) == 3

    @property
    def class_names(self) -> list[str]:
        if self.intensity_classes:
            return [NEGATIVE, ONE_PLUS, TWO_PLUS, THREE_PLUS]
        return [NEGATIVE, POSITIVE]

    def classify(self, dab_mean: float) -> str:
        """The class of a nucleus whose mean DAB OD is ``dab_mean`` (NaN: Negative)."""
        v = float(dab_mean)
        if not v == v:  # NaN
            return NEGATIVE
        if self.intensity_classes:
            t1, t2, t3 = self.thresholds
            return THREE_PLUS if v >= t3 else TWO_PLUS if v >= t2 else ONE_PLUS if v >= t1 else NEGATIVE
        return POSITIVE if v >= self.thresholds[0] else NEGATIVE

    def summary(self, counts: dict[str, int]) -> dict[str, Any]:
        """Counts per class, positive percentage (and H-score with three thresholds) for the run summary."""
        total = sum(counts.get(c, 0) for c in self.class_names)
        positive = total - counts.get(NEGATIVE, 0)
        out: dict[str, Any] = {"positivity": "dab", "positivity_thresholds": list(self.thresholds)}
        for c in self.class_names:
            out[_key(c)] = int(counts.get(c, 0))
        if self.intensity_classes:
            out["positive"] = int(positive)
        out["positive_percent"] = round(100.0 * positive / total, 2) if total else None
        if self.intensity_classes:
            h = sum(k * counts.get(c, 0) for k, c in ((1, ONE_PLUS), (2, TWO_PLUS), (3, THREE_PLUS)))
            out["h_score"] = round(100.0 * h / total, 1) if total else None
        return out


def _key(name: str) -> str:
    return {POSITIVE: "positive", NEGATIVE: "negative", ONE_PLUS: "1+", TWO_PLUS: "2+", THREE_PLUS: "3+"}[name]


def parse_positivity(kind: str | None, threshold: str | Sequence[float] | None) -> Positivity | None:
    """``--positivity`` / ``--positivity-threshold`` -> a :class:`Positivity` (or None); one-line errors."""
    if kind is None:
        if threshold is not None:
            raise UsageError("--positivity-threshold needs --positivity dab")
        return None
    if str(kind).lower() != "dab":
        raise UsageError(f"unknown --positivity '{kind}'; the only stain scored is: dab")
    if threshold is None:
        return Positivity()
    if isinstance(threshold, str):
        parts = [p.strip() for p in threshold.split(",")]
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            raise UsageError(f"--positivity-threshold '{threshold}' is not a number or three comma-separated "
                             "numbers (e.g. 0.2, or 0.2,0.4,0.6 for 1+/2+/3+)") from None
    else:
        values = tuple(float(v) for v in threshold)
    if len(values) not in (1, 3):
        raise UsageError(f"--positivity-threshold takes one OD value (Positive/Negative) or three (1+/2+/3+), "
                         f"got {len(values)}")
    if not all(v == v and 0.0 < v < 10.0 for v in values):
        raise UsageError("--positivity-threshold values are optical densities: each above 0 and below 10")
    if len(values) == 3 and not values[0] < values[1] < values[2]:
        raise UsageError(f"--positivity-threshold {','.join(map(str, values))}: the three thresholds must increase "
                         "(1+ < 2+ < 3+)")
    return Positivity(values)


def stain_problem(samples: list[np.ndarray], brightfield: bool) -> str | None:
    """Why DAB positivity cannot be scored on these sample tiles (None: it can)."""
    if not brightfield:
        return ("--positivity dab needs a brightfield IHC slide (hematoxylin + DAB); this slide is fluorescence")
    from nucli.postprocess import BRIGHTFIELD, tissue_pixels

    vals = [eosin_od(t)[tissue_pixels(t, BRIGHTFIELD)] for t in samples if t.size]
    vals = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    if vals.size < 100:
        return None
    p90 = float(np.percentile(vals, 90))
    if p90 > EOSIN_P90_MAX:
        return (f"--positivity dab needs a hematoxylin-DAB (IHC) slide, but this one looks like H&E (eosin OD "
                f"{p90:.2f} at the 90th percentile of tissue, above {EOSIN_P90_MAX}); leave out --positivity")
    return None


__all__ = ["CLASS_COLORS", "DEFAULT_THRESHOLD", "Positivity", "parse_positivity", "dab_od", "eosin_od",
           "stain_problem", "POSITIVE", "NEGATIVE", "ONE_PLUS", "TWO_PLUS", "THREE_PLUS"]
