"""Nucleus-segmentation metrics: Dice, AJI, AJI+, DQ/SQ/PQ, object F1.

Every metric of one image is computed from ONE sparse contingency table
between the ground-truth (GT) label image ``G`` and the predicted label image
``P`` (0 = background, any other integer = one object). The table is built
from the runs of equal ``(g, p)`` label pairs along the raster order, so its
cost is one pass over the pixels plus work proportional to the number of
runs; no loop ever visits a pair of objects.

Definitions (``G_i`` GT objects, ``P_j`` predicted objects, ``|.|`` pixel counts):

* **Dice** (binary foreground, pixel level)::

      Dice = 2 |FG(G) ∩ FG(P)| / (|FG(G)| + |FG(P)|)

* **AJI**, Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017). Each GT
  object is paired with the prediction of highest IoU, ``j*(i) = argmax_j
  |G_i ∩ P_j| / |G_i ∪ P_j|`` (a prediction may be chosen by several GT
  objects); predictions chosen by no GT object form the set ``U``::

      AJI = Σ_i |G_i ∩ P_j*(i)| / ( Σ_i |G_i ∪ P_j*(i)| + Σ_{k∈U} |P_k| )

  A GT object that overlaps no prediction adds ``|G_i|`` to the denominator.

* **AJI+** (Graham et al., HoVer-Net, Medical Image Analysis 2019): the same
  ratio, but the pairing is one-to-one: the unique pairing (maximum-weight
  bipartite matching) of maximal total IoU among overlapping pairs. Unpaired
  GT and unpaired predicted objects add their areas to the denominator::

      AJI+ = Σ_{(i,j)∈M} |G_i ∩ P_j| / ( Σ_{(i,j)∈M} |G_i ∪ P_j| + Σ_{i∉M} |G_i| + Σ_{j∉M} |P_j| )

  When the AJI pairing is already one-to-one it is such a maximal pairing and
  AJI+ equals AJI. Otherwise neither bounds the other: AJI+ is higher when a
  prediction was used by a GT object that overlaps it little (AJI counts that
  prediction's pixels twice), lower for a pure merge of several GT objects.

* **DQ, SQ, PQ**, panoptic quality (Kirillov et al., CVPR 2019; for nuclei
  Graham et al. 2019). A true positive (TP) is a pair with IoU > 0.5 (such
  pairs are necessarily unique); FP = unpaired predictions, FN = unpaired GT::

      DQ = |TP| / (|TP| + ½|FP| + ½|FN|)
      SQ = Σ_{(i,j)∈TP} IoU(G_i, P_j) / |TP|
      PQ = DQ × SQ

* **Object precision, recall, F1** at the same IoU > 0.5 matching:
  ``precision = TP / n_pred``, ``recall = TP / n_true``,
  ``F1 = 2TP / (2TP + FP + FN)`` (numerically equal to DQ).

Empty images (no object on one or both sides) follow one rule for every
metric: **both empty -> 1** (a perfect answer), **exactly one empty -> 0**.

Ties (two predictions of exactly equal IoU with one GT object) are broken in
favour of the object whose first pixel comes first in raster order, so the
result never depends on which integers the objects were given.

Aggregates over a data set: :func:`mean_metrics` averages the per-image
metrics (the convention of the published tables); :func:`pooled_metrics`
sums the underlying counts over all images first ("pooled over all nuclei":
large, crowded images weigh more).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Iterable, Sequence

import numpy as np

#: Metric names, in the order tables print them.
METRICS: tuple[str, ...] = ("aji", "aji_plus", "dice", "dq", "sq", "pq", "precision", "recall", "f1")

#: Human-readable column titles.
METRIC_TITLES: dict[str, str] = {
    "aji": "AJI",
    "aji_plus": "AJI+",
    "dice": "Dice",
    "dq": "DQ",
    "sq": "SQ",
    "pq": "PQ",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
}

#: IoU a pair must exceed to count as a detection (PQ and object F1).
MATCH_IOU = 0.5


@dataclass(frozen=True)
class ImageCounts:
    """The sufficient statistics of one image (or, summed, of many).

    All metrics are ratios of these counts, so counts from several images can
    be added (:meth:`__add__`) to obtain pooled metrics.
    """

    n_true: int = 0
    n_pred: int = 0
    fg_inter: int = 0  # |FG(G) ∩ FG(P)|
    fg_true: int = 0  # |FG(G)|
    fg_pred: int = 0  # |FG(P)|
    aji_inter: int = 0
    aji_union: int = 0
    aji_plus_inter: int = 0
    aji_plus_union: int = 0
    tp: int = 0  # pairs with IoU > 0.5
    iou_sum: float = 0.0  # Σ IoU over those pairs

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_true - self.tp

    def __add__(self, other: "ImageCounts") -> "ImageCounts":
        return ImageCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """All metrics of :data:`METRICS` from these counts (see module docstring)."""
        both_empty = self.n_true == 0 and self.n_pred == 0
        one_empty = (self.n_true == 0) != (self.n_pred == 0)

        def ratio(num: float, den: float) -> float:
            if both_empty:
                return 1.0
            if one_empty or den == 0:
                return 0.0
            return float(num) / float(den)

        tp, fp, fn = self.tp, self.fp, self.fn
        dq = ratio(tp, tp + 0.5 * fp + 0.5 * fn)
        sq = ratio(self.iou_sum, tp)
        if both_empty:
            dice = 1.0
        else:
            den = self.fg_true + self.fg_pred
            dice = 2.0 * self.fg_inter / den if den else 0.0
        return {
            "aji": ratio(self.aji_inter, self.aji_union),
            "aji_plus": ratio(self.aji_plus_inter, self.aji_plus_union),
            "dice": dice,
            "dq": dq,
            "sq": sq,
            "pq": dq * sq,
            "precision": ratio(tp, self.n_pred),
            "recall": ratio(tp, self.n_true),
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
        }


# --------------------------------------------------------------------------- contingency


@dataclass(frozen=True)
class Contingency:
    """Sparse overlap table of one image pair, objects renumbered 1..n.

    Objects are numbered in the raster order of their first pixel (a numbering
    that does not depend on the original ids). ``rows``/``cols``/``inter`` list
    every overlapping (GT, prediction) pair; ``area_true[0]`` and
    ``area_pred[0]`` are background pixel counts.
    """

    area_true: np.ndarray  # int64 (n_true + 1,)
    area_pred: np.ndarray  # int64 (n_pred + 1,)
    rows: np.ndarray  # int64 (K,) GT object index, 1..n_true
    cols: np.ndarray  # int64 (K,) predicted object index, 1..n_pred
    inter: np.ndarray  # int64 (K,) overlap in pixels (> 0)

    @property
    def n_true(self) -> int:
        return len(self.area_true) - 1

    @property
    def n_pred(self) -> int:
        return len(self.area_pred) - 1

    @property
    def union(self) -> np.ndarray:
        return self.area_true[self.rows] + self.area_pred[self.cols] - self.inter

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union


def _check_labels(name: str, labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label image, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label image, got shape {arr.shape}")
    return arr


def _renumber(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Map run values (raster order) to 0 (background) and 1..n by first appearance."""
    out = np.zeros(values.shape, dtype=np.int64)
    fg = values != 0
    if not fg.any():
        return out, 0
    ids, first, inverse = np.unique(values[fg], return_index=True, return_inverse=True)
    if ids[0] < 0:
        raise ValueError(f"label images must not contain negative ids (found {ids[0]})")
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(1, len(ids) + 1)
    out[fg] = rank[inverse.ravel()]
    return out, len(ids)


def contingency(true: np.ndarray, pred: np.ndarray) -> Contingency:
    """Build the sparse overlap table of two label images of equal shape."""
    true = _check_labels("true", true)
    pred = _check_labels("pred", pred)
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: true {true.shape} vs pred {pred.shape}")
    t = np.ascontiguousarray(true).ravel()
    p = np.ascontiguousarray(pred).ravel()
    n = t.size
    if n == 0:
        z = np.zeros(1, dtype=np.int64)
        e = np.zeros(0, dtype=np.int64)
        return Contingency(z, z.copy(), e, e.copy(), e.copy())
    # Runs of constant (t, p) along the raster order.
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(t[1:], t[:-1], out=change[1:])
    change[1:] |= p[1:] != p[:-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(starts, append=n).astype(np.int64)
    tv, n_true = _renumber(t[starts])
    pv, n_pred = _renumber(p[starts])
    area_true = np.bincount(tv, weights=lengths, minlength=n_true + 1).astype(np.int64)
    area_pred = np.bincount(pv, weights=lengths, minlength=n_pred + 1).astype(np.int64)
    both = (tv > 0) & (pv > 0)
    codes = tv[both] * (n_pred + 1) + pv[both]
    pair_codes, inverse = np.unique(codes, return_inverse=True)
    inter = np.bincount(inverse.ravel(), weights=lengths[both], minlength=len(pair_codes)).astype(np.int64)
    return Contingency(area_true, area_pred, pair_codes // (n_pred + 1), pair_codes % (n_pred + 1), inter)


# --------------------------------------------------------------------------- pairings


def best_match(table: Contingency) -> np.ndarray:
    """AJI pairing: for each overlapping pair index, True where it is the GT object's best.

    Best = highest IoU; ties go to the prediction numbered first.
    """
    keep = np.zeros(len(table.rows), dtype=bool)
    if len(table.rows) == 0:
        return keep
    order = np.lexsort((table.cols, -table.iou, table.rows))
    r = table.rows[order]
    first = np.ones(len(r), dtype=bool)
    first[1:] = r[1:] != r[:-1]
    keep[order[first]] = True
    return keep


def unique_match(table: Contingency, best: np.ndarray | None = None) -> np.ndarray:
    """AJI+ pairing: a one-to-one pairing of maximal total IoU (mask over pairs).

    Connected groups of overlapping objects in which the AJI pairing is already
    one-to-one keep it (it is then optimal: every GT object gets its best
    IoU). The remaining groups are solved together, as one sparse
    minimum-cost bipartite matching (LAPJVsp) in which every GT object may
    instead take a private "unpaired" column: cost ``2 - IoU`` for a real
    pair, ``2`` for staying unpaired, so the minimum cost is ``2 n - max Σ IoU``.
    """
    if best is None:
        best = best_match(table)
    chosen = best.copy()
    if len(table.rows) == 0:
        return chosen
    uses = np.bincount(table.cols[best], minlength=table.n_pred + 1)
    conflicted = uses > 1
    if not conflicted.any():
        return chosen

    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching

    nt, npred = table.n_true + 1, table.n_pred + 1
    graph = coo_array(
        (np.ones(len(table.rows), dtype=np.int8), (table.rows, nt + table.cols)), shape=(nt + npred, nt + npred)
    )
    _, comp = connected_components(graph, directed=False)
    bad_comp = np.zeros(comp.max() + 1, dtype=bool)
    bad_comp[comp[nt + np.flatnonzero(conflicted)]] = True
    sel = bad_comp[comp[table.rows]]  # pairs inside groups that need solving
    chosen[sel] = False

    rows, cols, iou = table.rows[sel], table.cols[sel], table.iou[sel]
    row_ids, r = np.unique(rows, return_inverse=True)
    col_ids, c = np.unique(cols, return_inverse=True)
    k, m = len(row_ids), len(col_ids)
    data = np.concatenate([2.0 - iou, np.full(k, 2.0)])
    ri = np.concatenate([r.ravel(), np.arange(k)])
    ci = np.concatenate([c.ravel(), m + np.arange(k)])
    cost = coo_array((data, (ri, ci)), shape=(k, m + k)).tocsr()
    mr, mc = min_weight_full_bipartite_matching(cost)
    real = mc < m
    matched_codes = row_ids[mr[real]] * npred + col_ids[mc[real]]
    sel_idx = np.flatnonzero(sel)
    hit = np.isin(rows * npred + cols, matched_codes)
    chosen[sel_idx[hit]] = True
    return chosen


# --------------------------------------------------------------------------- scoring


def _aggregated_jaccard(table: Contingency, pairs: np.ndarray) -> tuple[int, int]:
    """(Σ intersections, Σ unions + unpaired areas) for a pairing mask."""
    rows, cols = table.rows[pairs], table.cols[pairs]
    inter = int(table.inter[pairs].sum())
    union = int((table.area_true[rows] + table.area_pred[cols] - table.inter[pairs]).sum())
    true_paired = np.zeros(table.n_true + 1, dtype=bool)
    true_paired[rows] = True
    pred_used = np.zeros(table.n_pred + 1, dtype=bool)
    pred_used[cols] = True
    union += int(table.area_true[1:][~true_paired[1:]].sum())
    union += int(table.area_pred[1:][~pred_used[1:]].sum())
    return inter, union


def score_table(table: Contingency) -> ImageCounts:
    """All counts of one image from its contingency table."""
    best = best_match(table)
    aji_i, aji_u = _aggregated_jaccard(table, best)
    plus_i, plus_u = _aggregated_jaccard(table, unique_match(table, best))
    iou = table.iou
    tp_mask = iou > MATCH_IOU
    fg_true = int(table.area_true[1:].sum())
    fg_pred = int(table.area_pred[1:].sum())
    return ImageCounts(
        n_true=table.n_true,
        n_pred=table.n_pred,
        fg_inter=int(table.inter.sum()),
        fg_true=fg_true,
        fg_pred=fg_pred,
        aji_inter=aji_i,
        aji_union=aji_u,
        aji_plus_inter=plus_i,
        aji_plus_union=plus_u,
        tp=int(tp_mask.sum()),
        iou_sum=float(iou[tp_mask].sum()),
    )


def score_image(true: np.ndarray, pred: np.ndarray) -> ImageCounts:
    """Counts of one image: ``true`` and ``pred`` are 2-D integer label images.

    Ids need not be contiguous or matching; 0 is background. Use
    ``.metrics()`` on the result for the metric values.
    """
    return score_table(contingency(true, pred))


def evaluate_image(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Metrics of one image plus ``n_true`` and ``n_pred`` (convenience)."""
    counts = score_image(true, pred)
    return {**counts.metrics(), "n_true": counts.n_true, "n_pred": counts.n_pred}


def mean_metrics(counts: Sequence[ImageCounts]) -> dict[str, float]:
    """Mean over images of each per-image metric (the published-table convention)."""
    if not counts:
        return {name: float("nan") for name in METRICS}
    per = [c.metrics() for c in counts]
    return {name: float(np.mean([m[name] for m in per])) for name in METRICS}


def pooled_metrics(counts: Iterable[ImageCounts]) -> dict[str, float]:
    """Metrics of the summed counts: every nucleus of every image weighs the same."""
    total = ImageCounts()
    for c in counts:
        total = total + c
    return total.metrics()
