"""nucli.metrics: hand-computed cases, a direct reference implementation, properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from nucli.metrics import (
    METRICS,
    ImageCounts,
    best_match,
    contingency,
    evaluate_image,
    mean_metrics,
    pooled_metrics,
    score_image,
    unique_match,
)


def metrics_of(true, pred) -> dict[str, float]:
    return score_image(np.asarray(true), np.asarray(pred)).metrics()


def assert_metrics(got: dict, **expected: float) -> None:
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def canvas(h=12, w=16):
    return np.zeros((h, w), dtype=np.int32)


# --------------------------------------------------------------------------- hand-computed


def test_identical_labels_score_one_everywhere():
    t = canvas()
    t[1:5, 1:5] = 1
    t[6:10, 2:9] = 2
    t[0:3, 10:14] = 3
    res = evaluate_image(t, t.copy())
    assert_metrics(res, **{m: 1.0 for m in METRICS})
    assert res["n_true"] == res["n_pred"] == 3


def test_empty_vs_empty_is_perfect():
    counts = score_image(canvas(), canvas())
    assert (counts.n_true, counts.n_pred) == (0, 0)
    assert_metrics(counts.metrics(), **{m: 1.0 for m in METRICS})


@pytest.mark.parametrize("gt_empty", [True, False])
def test_one_side_empty_scores_zero(gt_empty):
    full = canvas()
    full[2:6, 2:6] = 4
    full[7:9, 7:12] = 9
    t, p = (canvas(), full) if gt_empty else (full, canvas())
    res = evaluate_image(t, p)
    assert_metrics(res, **{m: 0.0 for m in METRICS})
    assert (res["n_true"], res["n_pred"]) == ((0, 2) if gt_empty else (2, 0))


def test_one_nucleus_split_in_two():
    # GT: one 4x4 nucleus (16 px). Prediction: 4x3 (12 px) + 4x1 (4 px).
    t = canvas()
    t[2:6, 2:6] = 1
    p = canvas()
    p[2:6, 2:5] = 1
    p[2:6, 5:6] = 2
    # IoUs 12/16 = 0.75 and 4/16 = 0.25. AJI pairs GT with the 0.75 piece:
    # C = 12, U = 16 + 4 (unused piece) = 20. One TP (0.75), one FP.
    assert_metrics(
        metrics_of(t, p),
        dice=1.0, aji=12 / 20, aji_plus=12 / 20,
        dq=1 / 1.5, sq=0.75, pq=0.75 / 1.5,
        precision=0.5, recall=1.0, f1=2 / 3,
    )


def test_split_in_equal_halves_has_no_match_at_iou_half():
    t = canvas()
    t[2:6, 2:6] = 1
    p = canvas()
    p[2:6, 2:4] = 7
    p[2:6, 4:6] = 3
    # IoU exactly 0.5 is not a match (IoU > 0.5 is required).
    # AJI: C = 8, U = 16 + 8 = 24.
    assert_metrics(metrics_of(t, p), aji=1 / 3, aji_plus=1 / 3, dq=0.0, sq=0.0, pq=0.0, f1=0.0, dice=1.0)


def test_two_nuclei_merged_into_one_unequal():
    # GT: 4x4 (16 px) and 2x2 (4 px), touching. Prediction: their union (20 px).
    t = canvas()
    t[0:4, 0:4] = 1
    t[0:2, 4:6] = 2
    p = (t > 0).astype(np.int32) * 5
    # IoUs 16/20 = 0.8 and 4/20 = 0.2; both GT pick the merged prediction:
    # AJI: C = 16 + 4, U = 20 + 20 -> 0.5.
    # AJI+: unique pairing keeps (1, p): C = 16, U = 20 + 4 (unpaired GT) -> 2/3.
    # PQ: one TP at 0.8, one FN.
    assert_metrics(
        metrics_of(t, p),
        dice=1.0, aji=0.5, aji_plus=2 / 3,
        dq=1 / 1.5, sq=0.8, pq=0.8 / 1.5,
        precision=1.0, recall=0.5, f1=2 / 3,
    )


def test_two_equal_nuclei_merged_aji_plus_below_aji():
    # AJI+ is not always >= AJI: a pure merge of two equal nuclei.
    t = canvas()
    t[0:4, 0:4] = 1
    t[0:4, 4:8] = 2
    p = (t > 0).astype(np.int32)
    # AJI: C = 32, U = 32 + 32 -> 0.5; AJI+: C = 16, U = 32 + 16 -> 1/3.
    assert_metrics(metrics_of(t, p), aji=0.5, aji_plus=1 / 3, dq=0.0, pq=0.0, dice=1.0)


def test_shifted_nuclei_exact_values():
    t = canvas(12, 20)
    t[1:5, 1:5] = 1
    t[1:5, 8:12] = 2
    t[7:11, 1:5] = 3
    p = canvas(12, 20)
    p[1:5, 2:6] = 1  # shifted 1 px: inter 12, union 20, IoU 0.6
    p[1:5, 9:13] = 2  # shifted 1 px: IoU 0.6
    p[7:11, 3:7] = 3  # shifted 2 px: inter 8, union 24, IoU 1/3 (no match)
    assert_metrics(
        metrics_of(t, p),
        aji=(12 + 12 + 8) / (20 + 20 + 24), aji_plus=32 / 64,
        dice=2 * 32 / (48 + 48),
        dq=2 / 3, sq=0.6, pq=0.4,
        precision=2 / 3, recall=2 / 3, f1=2 / 3,
    )


def test_unmatched_gt_and_prediction_enter_the_aji_denominator():
    t = canvas()
    t[0:4, 0:4] = 1  # matched perfectly
    t[8:10, 8:10] = 2  # missed (4 px)
    p = canvas()
    p[0:4, 0:4] = 1
    p[5:8, 12:15] = 2  # false positive (9 px)
    # C = 16, U = 16 + 4 + 9.
    assert_metrics(metrics_of(t, p), aji=16 / 29, aji_plus=16 / 29, dq=1 / 2, sq=1.0, precision=0.5, recall=0.5)


def test_small_nucleus_pulled_onto_big_prediction_aji_plus_above_aji():
    t = canvas()
    t[0:6, 0:6] = 1  # 36 px
    t[0:2, 6:10] = 2  # 8 px
    p = canvas()
    p[0:6, 0:8] = 1  # 48 px: covers GT 1 and 4 px of GT 2
    p[1, 9] = 2  # 1 px inside GT 2
    # GT 2: IoU 4/52 with prediction 1, 1/8 with prediction 2 -> picks 2. One-to-one: AJI+ == AJI.
    assert_metrics(metrics_of(t, p), aji=(36 + 1) / (48 + 8), aji_plus=(36 + 1) / (48 + 8))
    p[1, 9] = 0  # now both GT nuclei pick prediction 1
    # AJI: C = 36 + 4, U = 48 + 52 -> 0.4 (prediction 1 counted twice).
    # AJI+: prediction 1 pairs with GT 1 only; GT 2 unpaired: C = 36, U = 48 + 8.
    assert_metrics(metrics_of(t, p), aji=40 / 100, aji_plus=36 / 56)


def test_relabelled_ids_do_not_change_anything():
    rng = np.random.default_rng(3)
    t = canvas(20, 20)
    p = canvas(20, 20)
    t[1:6, 1:6] = 1
    t[1:6, 6:9] = 2
    t[10:15, 2:12] = 3
    p[1:6, 1:9] = 1  # merge
    p[10:15, 2:7] = 2  # split
    p[10:15, 7:12] = 3
    p[16:19, 16:19] = 4  # false positive
    base = score_image(t, p)
    for _ in range(5):
        perm_t = np.concatenate([[0], rng.permutation(np.arange(1, 1000))[:4]])
        perm_p = np.concatenate([[0], rng.permutation(np.arange(1, 1000))[:5]])
        assert score_image(perm_t[t], perm_p[p]) == base


def test_non_contiguous_and_large_ids():
    t = canvas()
    t[1:5, 1:5] = 1
    t[6:10, 2:9] = 2
    p = canvas()
    p[1:5, 2:6] = 1
    p[6:10, 2:7] = 2
    p[0:2, 12:15] = 3
    expected = score_image(t, p)
    t2 = np.where(t == 1, 17, np.where(t == 2, 65535, 0)).astype(np.uint16)
    p2 = np.where(p == 1, 4_000_000_000, np.where(p == 2, 3, np.where(p == 3, 250, 0))).astype(np.uint64)
    assert score_image(t2, p2) == expected
    assert score_image(t2.astype(np.int64), p2) == expected


def test_object_in_two_disconnected_pieces_is_one_object():
    t = canvas()
    t[0:2, 0:2] = 1
    t[5:7, 5:7] = 1
    res = evaluate_image(t, t)
    assert res["n_true"] == 1 and res["aji"] == 1.0


def test_ties_do_not_depend_on_ids():
    # GT 1 (8 px) has two predictions of exactly equal IoU: a (2 px inside, 2/8) and
    # b (3 px inside + 4 px on GT 2, 3/12). The choice changes AJI, so it must not
    # depend on the ids: the prediction whose first pixel comes first (a) wins.
    t = canvas()
    t[0:2, 0:4] = 1
    t[4:6, 0:2] = 2
    a = canvas()
    a[0:2, 0] = 1
    b = canvas()
    b[0:2, 1] = 1
    b[0, 2] = 1
    b[4:6, 0:2] = 1
    # GT 1 -> a: C = 2 + 4 (GT 2 -> b, IoU 4/7), U = 8 + 7  -> 0.4
    # (GT 1 -> b would give C = 7, U = 12 + 7 + 2 -> 1/3).
    for ida, idb in ((1, 2), (2, 1), (900, 5)):
        p = a * ida + b * idb
        assert_metrics(metrics_of(t, p), aji=0.4)


def test_shape_and_dtype_checks():
    with pytest.raises(ValueError, match="shape"):
        score_image(canvas(4, 4), canvas(4, 5))
    with pytest.raises(ValueError, match="integer"):
        score_image(canvas().astype(float), canvas())
    with pytest.raises(ValueError, match="integer"):
        score_image(canvas() > 0, canvas())
    with pytest.raises(ValueError, match="negative"):
        score_image(canvas() - 1, canvas())
    with pytest.raises(ValueError, match="2-D"):
        score_image(np.zeros((2, 3, 3), int), np.zeros((2, 3, 3), int))


# --------------------------------------------------------------------------- aggregates


def test_mean_and_pooled_aggregates():
    a_t = canvas()
    a_t[0:4, 0:4] = 1
    a = score_image(a_t, a_t)  # perfect, 16 px
    b_p = canvas()
    b_p[0:2, 0:2] = 1
    b = score_image(canvas(), b_p)  # empty GT, one 4-px false positive
    mean = mean_metrics([a, b])
    pooled = pooled_metrics([a, b])
    assert_metrics(mean, aji=0.5, pq=0.5, dice=0.5, precision=0.5, recall=0.5)
    # Pooled: AJI = 16 / (16 + 4); TP 1, FP 1, FN 0 -> DQ 2/3, SQ 1; Dice 32 / 36.
    assert_metrics(pooled, aji=16 / 20, aji_plus=16 / 20, dq=2 / 3, sq=1.0, pq=2 / 3, dice=32 / 36,
                   precision=0.5, recall=1.0)
    empty = score_image(canvas(), canvas())
    assert_metrics(pooled_metrics([empty, empty]), **{m: 1.0 for m in METRICS})
    assert_metrics(mean_metrics([empty, a]), **{m: 1.0 for m in METRICS})
    assert (a + b).n_pred == 2 and ImageCounts() + a == a


# --------------------------------------------------------------------------- reference + properties


def _reference(t: np.ndarray, p: np.ndarray) -> tuple[float, float, int]:
    """Direct implementation of the published AJI (loops over objects), max AJI+ total IoU, TP count."""

    def objects(lab):
        ids, first = np.unique(lab.ravel(), return_index=True)
        keep = ids != 0
        return [lab == i for i in ids[keep][np.argsort(first[keep])]]

    T, P = objects(t), objects(p)
    inter = np.array([[(g & s).sum() for s in P] for g in T], dtype=float).reshape(len(T), len(P))
    union = np.array([[(g | s).sum() for s in P] for g in T], dtype=float).reshape(len(T), len(P))
    iou = inter / np.maximum(union, 1)
    c = u = 0.0
    used: set[int] = set()
    for i, g in enumerate(T):
        if len(P) and iou[i].max() > 0:
            j = int(np.argmax(iou[i]))
            c, u = c + inter[i, j], u + union[i, j]
            used.add(j)
        else:
            u += g.sum()
    u += sum(s.sum() for j, s in enumerate(P) if j not in used)
    aji = c / u if u else 1.0
    if len(T) and len(P):
        r, k = linear_sum_assignment(-iou)
        best_total = float(iou[r, k].sum())
    else:
        best_total = 0.0
    return aji, best_total, int((iou > 0.5).sum())


@st.composite
def label_images(draw, h=10, w=12, max_objects=6):
    lab = np.zeros((h, w), dtype=np.int32)
    n = draw(st.integers(0, max_objects))
    for k in range(1, n + 1):
        y = draw(st.integers(0, h - 1))
        x = draw(st.integers(0, w - 1))
        dy = draw(st.integers(1, 6))
        dx = draw(st.integers(1, 6))
        lab[y : y + dy, x : x + dx] = k
    return lab


@settings(max_examples=150, deadline=None)
@given(label_images(), label_images())
def test_matches_direct_reference_implementation(t, p):
    table = contingency(t, p)
    counts = score_image(t, p)
    aji, best_total, tp = _reference(t, p)
    if counts.n_true and counts.n_pred:
        assert counts.metrics()["aji"] == pytest.approx(aji, abs=1e-12)
    pairs = unique_match(table)
    assert table.iou[pairs].sum() == pytest.approx(best_total, abs=1e-9)
    assert len(set(table.rows[pairs])) == len(set(table.cols[pairs])) == pairs.sum()
    assert counts.tp == tp


@settings(max_examples=150, deadline=None)
@given(label_images(), label_images(), st.randoms(use_true_random=False))
def test_invariant_to_label_permutation(t, p, rnd):
    def permute(lab):
        ids = list(range(1, 300))
        rnd.shuffle(ids)
        lut = np.array([0] + ids, dtype=np.int64)
        return lut[lab]

    a = score_image(t, p).metrics()
    b = score_image(permute(t), permute(p)).metrics()
    assert b == pytest.approx(a, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(label_images(), label_images())
def test_aji_plus_at_least_aji_when_aji_pairing_is_one_to_one(t, p):
    table = contingency(t, p)
    best = best_match(table)
    m = score_image(t, p).metrics()
    cols = table.cols[best]
    if len(np.unique(cols)) == len(cols):
        # Each GT nucleus already has its best IoU and no prediction is shared:
        # this pairing is a maximal unique pairing, so AJI+ == AJI.
        assert m["aji_plus"] >= m["aji"] - 1e-12
        assert m["aji_plus"] == pytest.approx(m["aji"], abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(label_images(), label_images())
def test_ranges_and_symmetries(t, p):
    m = score_image(t, p).metrics()
    s = score_image(p, t).metrics()
    for name in METRICS:
        assert 0.0 <= m[name] <= 1.0
    assert m["f1"] == pytest.approx(m["dq"])
    assert m["pq"] <= m["dq"] + 1e-12
    for name in ("dice", "dq", "sq", "pq", "f1"):
        assert s[name] == pytest.approx(m[name], abs=1e-12)
    assert s["precision"] == pytest.approx(m["recall"], abs=1e-12)
