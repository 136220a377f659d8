"""MCF: correlation filters, fusion, gradient-direction centres, confidence loss, templates, weights, training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nucli.errors import InputError, UsageError, WeightsError

torch = pytest.importorskip("torch")


# ---------------------------------------------------------------- synthetic images
def disc_image(shape, centres, radius, bright=200, bg=20, blur=1.0, seed=0, rgb=False):
    """Bright discs on a dark background (fluorescence-like) + their instance labels."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = i
    img = np.where(labels > 0, bright, bg).astype(np.float32)
    img = ndi.gaussian_filter(img, blur) + rng.normal(0, 3, shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rgb:
        img = np.repeat(img[..., None], 3, axis=2)
    return img, labels


def local_maxima(a, k, size=5):
    from scipy import ndimage as ndi

    peaks = (a == ndi.maximum_filter(a, size=size)) & (a > 0)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-a[ys, xs])[:k]
    return sorted(zip(ys[order].tolist(), xs[order].tolist()))


def small_params(**kw):
    from nucli.models.mcf.detector import DetectorParams

    base = dict(k=3, scale_span=0.5, crops=(1.0, 0.75, 0.5), t=3, h=2)
    base.update(kw)
    return DetectorParams(**base)


def template_from(img, cy, cx, d):
    from nucli.models.mcf.features import prepare
    from nucli.models.mcf.templates import Template, cut_window

    return Template(cut_window(prepare(img), cy, cx, d), float(d), "test")


# ---------------------------------------------------------------- features
def test_features_shape_and_grey_names_sum_to_one():
    from nucli.models.mcf.features import features, n_channels, prepare

    img, _ = disc_image((37, 50), [(18, 20)], 6)
    prep = prepare(img)
    assert prep.shape == (3, 37, 50)
    assert np.all(prep[1:] == 0)  # a grey image has no chroma
    f = features(prep, cell=2)
    assert f.shape == (n_channels(), 19, 25)
    names = f[6:9]
    np.testing.assert_allclose(names.sum(axis=0), 1.0, atol=1e-5)
    # the orientation channels respond at the disc rim, not in flat background
    hog = f[:6].sum(axis=0)
    assert hog[9, 10 + 3] > 10 * hog[2, 22]


def test_prepare_crop_inverts_dark_nucleus_on_bright_background():
    from nucli.models.mcf.features import prepare_crop

    img, _ = disc_image((21, 21), [(10, 10)], 6, bright=40, bg=220)
    prep = prepare_crop(img)
    assert prep[0, 10, 10] > 0.8 and prep[0, 0, 0] < 0.2


# ---------------------------------------------------------------- correlation filter
def test_filter_trained_on_a_blob_peaks_at_blob_centres():
    from nucli.models.mcf.features import features, prepare
    from nucli.models.mcf.filters import build_filters, correlate_valid

    timg, _ = disc_image((64, 64), [(32, 32)], 6, seed=1)
    t = template_from(timg, 32, 32, 12)
    (h,), = build_filters([t], k=1, cell=2)
    # the filter applied to its own template reproduces the desired peak at the centre cell
    centres = [(20, 24), (30, 70), (60, 40)]
    img, _ = disc_image((84, 96), centres, 6, seed=2)
    r = correlate_valid(features(prepare(img), cell=2), h)
    peaks = local_maxima(r, 3)
    expected = sorted(((cy - 0.5) / 2, (cx - 0.5) / 2) for cy, cx in centres)
    for (py, px), (ey, ex) in zip(peaks, expected):
        assert abs(py - ey) <= 1 and abs(px - ex) <= 1
    # the three blob peaks stand well above anything in the background
    bg = r.copy()
    for py, px in peaks:
        bg[max(py - 6, 0): py + 7, max(px - 6, 0): px + 7] = -np.inf
    assert min(r[p] for p in peaks) > 2 * bg.max()


def test_train_filter_reproduces_desired_response_on_its_template():
    from nucli.models.mcf.filters import gaussian_at_origin, train_filter

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 15, 15)).astype(np.float32)
    h = train_filter(x, sigma=2.0, lam=1e-4)
    xw = x * np.outer(np.hanning(17)[1:-1], np.hanning(17)[1:-1])[None]
    # circular correlation of the windowed template with the filter ~ the desired Gaussian
    resp = np.real(np.fft.ifft2((np.fft.fft2(xw) * np.conj(np.fft.fft2(h))).sum(0)))
    np.testing.assert_allclose(resp, gaussian_at_origin(15, 2.0), atol=0.02)


def test_scale_factors_cover_span():
    from nucli.models.mcf.filters import scale_factors

    f = scale_factors(5, 1.0)
    assert len(f) == 5 and f[2] == pytest.approx(1.0)
    assert f[0] == pytest.approx(2 ** -0.5) and f[-1] == pytest.approx(2 ** 0.5)
    assert scale_factors(1) == [1.0]


def test_detector_finds_blob_centres():
    from nucli.models.mcf.bank import Bank
    from nucli.models.mcf.features import prepare

    timg, _ = disc_image((64, 64), [(32, 32)], 6, seed=1)
    bank = Bank.build([template_from(timg, 32, 32, 12)], small_params(h=1))
    centres = [(20, 24), (30, 70), (62, 40), (70, 80)]
    img, _ = disc_image((90, 100), centres, 6, seed=3)
    det = bank.detector.detect(prepare(img))
    assert det.response.shape == (90, 100)
    assert 0.0 <= det.response.min() and det.response.max() <= 1.0
    found = sorted(map(tuple, det.centres.tolist()))
    assert len(found) == len(centres)
    for (fy, fx), (cy, cx) in zip(found, sorted(centres)):
        assert math.hypot(fy - cy, fx - cx) <= 2.0


def test_detector_empty_image_gives_no_centres():
    from nucli.models.mcf.bank import Bank
    from nucli.models.mcf.features import prepare

    timg, _ = disc_image((64, 64), [(32, 32)], 6, seed=1)
    bank = Bank.build([template_from(timg, 32, 32, 12)], small_params(h=1))
    flat = np.random.default_rng(0).normal(20, 3, (80, 80)).clip(0, 255).astype(np.uint8)
    det = bank.detector.detect(prepare(flat))
    assert len(det.centres) == 0  # the floor keeps noise from being stretched into nuclei


@pytest.mark.parametrize("crops,t", [((1.0, 0.6), 3), ((1.0, 0.8, 0.6, 0.4), 2)])
def test_fft_detector_matches_spatial_reference(crops, t):
    """The FFT implementation (weights folded into the filters) equals the plain Eq. 2-3 definitions."""
    from nucli.models.mcf import fusion
    from nucli.models.mcf.detector import Detector
    from nucli.models.mcf.filters import correlate_valid

    rng = np.random.default_rng(1)
    d = 3
    filters = [[rng.normal(size=(d, s, s)).astype(np.float32) for s in (5, 7)] for _ in range(3)]
    params = small_params(k=2, crops=crops, t=t, h=2)
    det = Detector(filters, params)
    feats = rng.normal(size=(d, 56, 60)).astype(np.float32)
    fused, tmaps = det.fused_cells(feats, keep_template_maps=True)
    per_template = []
    for row in filters:
        scale_maps, gs = [], []
        for h in row:
            s = h.shape[-1]
            g = fusion.zero_sum_gaussian(s, params.g_sigma_frac)
            sizes = fusion.crop_sizes(s, crops)
            maps = [correlate_valid(feats, fusion.crop_centre(h, c)) for c in sizes]
            scale_maps.append(fusion.cff(maps, g, sizes, t))
            gs.append(g)
        per_template.append(fusion.mff(scale_maps, gs, t))
    ref = fusion.top_h(per_template, 2)
    m = 16  # away from the borders (padding differs there)
    np.testing.assert_allclose(fused[m:-m, m:-m], ref[m:-m, m:-m], rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    np.testing.assert_allclose(tmaps[1][m:-m, m:-m], per_template[1][m:-m, m:-m], rtol=1e-3,
                               atol=1e-3 * np.abs(ref).max())


# ---------------------------------------------------------------- fusion on hand-made maps
def test_top_sum_keeps_the_t_largest():
    from nucli.models.mcf.fusion import top_sum

    stack = np.array([[1.0, 5.0], [4.0, -1.0], [2.0, 2.0], [3.0, 0.0]])
    np.testing.assert_allclose(top_sum(stack, 2), [7.0, 7.0])
    np.testing.assert_allclose(top_sum(stack, 1), [4.0, 5.0])
    np.testing.assert_allclose(top_sum(stack, 9), stack.sum(0))


def test_zero_sum_weights_cancel_flat_response_and_keep_peaks():
    from nucli.models.mcf.fusion import crop_sizes, cff, weighted_patch_sum, zero_sum_gaussian

    g = zero_sum_gaussian(9)
    assert abs(g.sum()) < 1e-12 and g[4, 4] == g.max() and g[0, 0] < 0
    flat = np.full((30, 30), 0.7)
    assert np.abs(weighted_patch_sum(flat, g)[8:-8, 8:-8]).max() < 1e-9
    peak = np.zeros((30, 30))
    peak[15, 12] = 1.0
    out = weighted_patch_sum(peak, g)
    assert np.unravel_index(out.argmax(), out.shape) == (15, 12)
    # CFF over crops: the crops' weights are centre crops of G; a sharp peak survives, a plateau does not
    sizes = crop_sizes(9, (1.0, 0.5))
    assert sizes == [9, 5]
    plateau = np.zeros((30, 30))
    plateau[5:25, 5:25] = 1.0
    fused_peak = cff([peak, peak], g, sizes, t=3)
    fused_plateau = cff([plateau, plateau], g, [9, 9], t=3)
    assert fused_peak[15, 12] > 0.1
    assert abs(fused_plateau[15, 15]) < 1e-9


def test_mff_and_top_h_choose_best_scale_and_templates():
    from nucli.models.mcf.fusion import mff, normalise, top_h, zero_sum_gaussian

    maps = [np.zeros((21, 21)) for _ in range(3)]
    maps[1][10, 10] = 2.0  # only the middle scale matches here
    maps[2][4, 4] = 1.0
    gs = [zero_sum_gaussian(s) for s in (3, 5, 7)]
    one = mff(maps, gs, t=1)
    assert np.unravel_index(one.argmax(), one.shape) == (10, 10)
    a, b, c = np.full((2, 2), 1.0), np.full((2, 2), 3.0), np.array([[2.0, 0.0], [0.0, 5.0]])
    np.testing.assert_allclose(top_h([a, b, c], 2), [[5.0, 4.0], [4.0, 8.0]])
    s = np.array([[-1.0, 0.5], [2.0, 1.0]])
    np.testing.assert_allclose(normalise(s), [[0.0, 0.25], [1.0, 0.5]])
    np.testing.assert_allclose(normalise(s, floor=4.0), [[0.0, 0.125], [0.5, 0.25]])


# ---------------------------------------------------------------- gradient-direction post-processing
def gaussian_map(shape, centres, sigma, heights=None):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.float32)
    for i, (cy, cx) in enumerate(centres):
        hgt = 1.0 if heights is None else heights[i]
        out = np.maximum(out, hgt * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2)))
    return out


def test_ray_weights_equal_the_double_sum():
    from nucli.models.mcf.centres import ray_weights

    p, q = 3, 10
    brute = np.zeros(q)
    for pp in range(1, p + 1):
        for qq in range(pp + 1, q + 1):
            brute[pp - 1] += 1
            brute[qq - 1] -= 1
    np.testing.assert_array_equal(ray_weights(p, q), brute)
    with pytest.raises(ValueError):
        ray_weights(5, 5)


def test_direction_gradients_match_brute_force():
    from nucli.models.mcf.centres import DIRECTIONS, direction_gradients

    rng = np.random.default_rng(0)
    s = rng.random((15, 17)).astype(np.float32)
    p, q = 2, 4
    d = direction_gradients(s, p, q)

    def at(i, j):
        return float(s[i, j]) if 0 <= i < s.shape[0] and 0 <= j < s.shape[1] else 0.0

    for r, (di, dj) in enumerate(DIRECTIONS):
        for i, j in [(0, 0), (7, 8), (14, 16), (3, 12)]:
            ref = sum(at(i + pp * di, j + pp * dj) - at(i + qq * di, j + qq * dj)
                      for pp in range(1, p + 1) for qq in range(pp + 1, q + 1))
            assert d[r, i, j] == pytest.approx(ref, abs=1e-4)


def test_gradient_postprocessing_single_peak():
    from nucli.models.mcf.centres import centres_from_response

    s = gaussian_map((40, 50), [(20, 30)], 5.0)
    centres, d = centres_from_response(s)
    assert centres.tolist() == [[20, 30]]
    assert d[20, 30] == d.max() > 0
    assert (d[s < 0.3] == 0).all()


def test_gradient_postprocessing_splits_conjoined_peaks():
    """Two touching nuclei give one connected high-response blob but two centres."""
    from scipy import ndimage as ndi

    from nucli.models.mcf.centres import centres_from_response

    s = gaussian_map((40, 60), [(20, 22), (20, 34)], 5.0, heights=[1.0, 0.8])
    assert ndi.label(s > 0.4)[1] == 1
    centres, _ = centres_from_response(s)
    found = sorted(centres.tolist())
    assert len(found) == 2
    for (fy, fx), (cy, cx) in zip(found, [(20, 22), (20, 34)]):
        assert fy == cy and abs(fx - cx) <= 1  # the neighbour pushes each maximum of D by at most a pixel


def test_gradient_postprocessing_rejects_ridges_plateaus_and_weak_peaks():
    from nucli.models.mcf.centres import centres_from_response

    yy, xx = np.mgrid[:40, :60]
    ridge = np.exp(-((yy - 20) ** 2) / 18.0).astype(np.float32)  # falls off across, flat along
    found = centres_from_response(ridge)[0]
    # flat along the ridge: no centre, except where the ridge ends at the image edge (outside counts as 0)
    assert all(x < 10 or x >= 50 for _, x in found.tolist())
    plateau = np.zeros((40, 40), np.float32)
    plateau[10:30, 10:30] = 1.0
    assert len(centres_from_response(plateau)[0]) == 0
    weak = gaussian_map((40, 40), [(20, 20)], 5.0, heights=[0.3])
    assert len(centres_from_response(weak, min_response=0.4)[0]) == 0
    assert len(centres_from_response(weak, min_response=0.2)[0]) == 1


# ---------------------------------------------------------------- confidence loss and pseudo masks
def test_confidence_loss_ignores_unconfident_pixels_exactly():
    import torch.nn.functional as F

    from nucli.models.mcf.confidence import IGNORE, confidence_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 8, 9, generator=g, requires_grad=True)
    target = torch.randint(0, 2, (2, 8, 9), generator=g)
    unconfident = torch.rand(2, 8, 9, generator=g) < 0.5
    target[unconfident] = IGNORE
    loss = confidence_loss(logits, target)
    loss.backward()
    grad = logits.grad.abs().sum(dim=1)  # (B, H, W)
    assert torch.all(grad[unconfident] == 0)  # exactly zero, not just small
    assert torch.all(grad[~unconfident] > 0)
    # value: plain CE averaged over the confident pixels
    ce = F.cross_entropy(logits.detach(), target.masked_fill(unconfident, 0), reduction="none")
    assert loss.item() == pytest.approx(ce[~unconfident].mean().item(), rel=1e-5)
    # nothing confident: loss 0 and no gradient at all
    logits.grad = None
    empty = confidence_loss(logits, torch.full((2, 8, 9), IGNORE))
    empty.backward()
    assert empty.item() == 0.0 and torch.all(logits.grad == 0)


def test_pseudo_target_dynamic_local_threshold():
    from nucli.models.mcf.confidence import IGNORE, pseudo_target, self_target

    s = gaussian_map((40, 70), [(20, 15), (20, 50)], 4.0, heights=[1.0, 0.5])
    t = pseudo_target(s, np.array([[20, 15], [20, 50]]), patch=16, t1=0.4, ratio=0.8)
    # each nucleus gets the pixels above 0.8 x its own peak: the weak one too
    assert t[20, 15] == 1 and t[20, 50] == 1
    assert s[20, 50] < 0.8  # one global threshold at 0.8 x the maximum would miss the weak nucleus
    assert t[20, 17] == 1 and t[20, 18] == IGNORE  # strong: core, then an unconfident ring (0.4 <= S <= 0.8)
    assert t[20, 52] == 1 and t[20, 53] == 0  # weak: S = 0.5 exp(-9/32) = 0.38 is below t1
    assert (t[s <= 0.4] != 1).all()
    assert t[0, 0] == 0 and t[20, 32] == 0
    # the guard removes confident background around detected centres
    g = pseudo_target(s, np.array([[20, 15]]), patch=16, t1=0.4, ratio=0.8, guard=1.0)
    assert g[20, 15 + 7] == IGNORE and g[20, 15 + 9] == 0
    st = self_target(np.array([[0.1, 0.5, 0.9]]))
    assert st.tolist() == [[0, IGNORE, 1]]


def test_synthetic_samples_paste_enlarged_nuclei_with_exact_labels():
    from nucli.models.mcf.confidence import confident_nuclei, pure_background, synthesize

    img, lab = disc_image((64, 64), [(20, 20), (44, 40)], 5, seed=4)
    grey = img.astype(np.float32) / 255.0
    target = np.full(lab.shape, 255, np.uint8)
    target[lab == 0] = 0
    from scipy import ndimage as ndi

    target[ndi.binary_erosion(lab > 0, iterations=2)] = 1
    rng = np.random.default_rng(0)
    nuclei = confident_nuclei(grey, target)
    assert len(nuclei) == 2
    bg = pure_background(grey, target, rng)
    assert bg.shape == grey.shape and bg[lab > 0].mean() < 0.2  # the nuclei are gone from the pure background
    x, y = synthesize(rng, bg, nuclei, 48, n_paste=4, enlarge=(1.5, 1.5))
    assert x.shape == y.shape == (48, 48)
    assert y.sum() > 0
    assert x[y == 1].mean() > 0.5 and x[y == 0].mean() < 0.3
    core = nuclei[0].mask.sum()
    areas = np.bincount(ndi.label(y)[0].ravel())[1:]
    assert areas.min() > 1.5 * core  # enlarged


# ---------------------------------------------------------------- instances
def test_instances_split_touching_nuclei_at_detected_centres():
    from nucli.models.mcf.method import instances_detection, instances_full

    yy, xx = np.mgrid[:40, :60]
    p1 = np.zeros((40, 60), np.float32)
    for cy, cx in [(20, 20), (20, 33)]:
        p1[(yy - cy) ** 2 + (xx - cx) ** 2 <= 49] = 0.9
    p1[(yy - 8) ** 2 + (xx - 52) ** 2 <= 9] = 0.9  # a nucleus the detection missed
    lab = instances_full(p1, np.array([[20, 20], [20, 33], [2, 2]]))
    assert lab.max() == 3
    assert lab[20, 20] != lab[20, 33] and lab[20, 20] > 0 and lab[8, 52] > 0
    # two detections in one round nucleus: no neck between them, so one nucleus
    one = np.zeros((40, 60), np.float32)
    one[(yy - 20) ** 2 + (xx - 30) ** 2 <= 100] = 0.9
    merged = instances_full(one, np.array([[20, 26], [20, 34]]))
    assert merged.max() == 1
    assert instances_full(one, np.array([[20, 26], [20, 34]]), neck_depth=0).max() == 2
    s = gaussian_map((40, 60), [(20, 20), (20, 33)], 4.0)
    det = instances_detection(s, np.array([[20, 20], [20, 33]]))
    assert det.max() == 2 and det[20, 20] != det[20, 33]
    assert instances_detection(s, np.zeros((0, 2), int)).max() == 0


# ---------------------------------------------------------------- templates
def test_templates_from_crops(tmp_path):
    from PIL import Image

    from nucli.models.mcf.templates import from_crops, window_side

    img, _ = disc_image((14, 16), [(7, 8)], 6, seed=5)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(np.repeat(img[..., None], 3, 2)).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("ignored")
    tps = from_crops(tmp_path)
    assert [t.source for t in tps] == ["crop:a.png", "crop:b.png"]
    assert tps[0].diameter == pytest.approx(15.0)
    assert tps[0].window.shape == (3, window_side(15.0), window_side(15.0))
    c = tps[0].size // 2
    assert tps[0].window[0, c, c] > 0.8 and tps[0].window[0, 0, 0] < 0.2
    with pytest.raises(InputError, match="no template images"):
        from_crops(_empty(tmp_path))
    with pytest.raises(InputError, match="not found"):
        from_crops(tmp_path / "nope")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_templates_from_geojson(tmp_path):
    from PIL import Image

    from nucli.models.mcf.templates import from_geojson

    img, _ = disc_image((60, 80), [(20, 20), (40, 60)], 6, seed=6)
    Image.fromarray(img).save(tmp_path / "img.png")
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [20.5, 20.5]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[54, 34], [67, 34], [67, 47], [54, 47],
                                                                            [54, 34]]]}, "properties": {}},
    ]}
    (tmp_path / "t.geojson").write_text(json.dumps(fc))
    tps = from_geojson(tmp_path / "img.png", tmp_path / "t.geojson", default_diameter=12)
    assert [t.diameter for t in tps] == [12.0, 13.0]
    for t in tps:
        c = t.size // 2
        assert t.window[0, c, c] > 0.7
    with pytest.raises(UsageError, match="diameter"):
        from_geojson(tmp_path / "img.png", tmp_path / "t.geojson")
    fc["features"][0]["geometry"]["coordinates"] = [500, 5]
    (tmp_path / "bad.geojson").write_text(json.dumps(fc))
    with pytest.raises(InputError, match="outside"):
        from_geojson(tmp_path / "img.png", tmp_path / "bad.geojson", default_diameter=12)
    (tmp_path / "junk.geojson").write_text("{not json")
    with pytest.raises(InputError, match="not valid GeoJSON"):
        from_geojson(tmp_path / "img.png", tmp_path / "junk.geojson", default_diameter=12)


def make_labelled_dir(root, n_images=3, size=(72, 80), seed=0):
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n_images):
        centres = [(int(rng.integers(12, size[0] - 12)), int(rng.integers(12, size[1] - 12))) for _ in range(6)]
        centres = [c for j, c in enumerate(centres) if all(math.dist(c, o) > 14 for o in centres[:j])]
        img, lab = disc_image(size, centres, 5, seed=seed + i)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        tifffile.imwrite(root / "labels" / f"im{i}.tif", lab.astype(np.uint16))
    return root


def test_templates_from_labels_are_seeded(tmp_path):
    from nucli.models.mcf.templates import from_labels

    d = make_labelled_dir(tmp_path / "set")
    a = from_labels(d, n=4, seed=3)
    b = from_labels(d, n=4, seed=3)
    c = from_labels(d, n=4, seed=4)
    assert [t.source for t in a] == [t.source for t in b]
    assert [t.source for t in a] != [t.source for t in c]
    assert all(9.0 < t.diameter < 12.0 for t in a)  # discs of radius 5
    with pytest.raises(InputError, match="cannot draw"):
        from_labels(d, n=500)
    with pytest.raises(UsageError):
        from_labels(d, n=0)


# ---------------------------------------------------------------- mask residual
def test_mask_residual_proposes_the_missed_nucleus(tmp_path):
    from nucli.models.mcf.bank import Bank
    from nucli.models.mcf.complement import load_images, propose_templates

    d = make_labelled_dir(tmp_path / "set", n_images=1)
    images = load_images(d)
    lab = images[0].labels
    timg, _ = disc_image((64, 64), [(32, 32)], 6, seed=1)
    bank = Bank.build([template_from(timg, 32, 32, 12)], small_params(k=1))
    p1 = (lab > 0).astype(np.float32) * 0.9
    target = np.zeros(lab.shape, np.uint8)
    ids = [i for i in np.unique(lab) if i]
    from scipy import ndimage as ndi

    for i in ids[1:]:  # the detection found all but the first nucleus
        target[ndi.binary_erosion(lab == i, iterations=2)] = 1
    new = propose_templates(bank, images, [p1], [target], n_max=2)
    assert len(new) == 1
    cy, cx = ndi.center_of_mass(lab == ids[0])
    y, x = (int(v) for v in new[0].source.split("@")[1].split(","))
    assert abs(y - cy) <= 1 and abs(x - cx) <= 1
    assert 9.0 < new[0].diameter < 12.0
    # a template is kept only when it raises the agreement between detection and segmentation
    from nucli.models.mcf.complement import agreement, complement_bank

    before = agreement(bank, images, [p1])
    new_bank, added, info = complement_bank(bank, images, [p1], [target], n_new=1)
    assert info["agreement_before"] == pytest.approx(before)
    assert info["agreement_after"] >= before
    assert len(new_bank.templates) == 1 + len(added)
    assert (len(added) == 1) == (info["agreement_after"] > before)


# ---------------------------------------------------------------- weights and method
def test_weights_round_trip_and_method(tmp_path):
    from nucli.models.mcf.bank import Bank
    from nucli.models.mcf.method import save_mcf_weights
    from nucli.models.mcf.segnet import build_unet
    from nucli.models.registry import build_method

    timg, _ = disc_image((64, 64), [(32, 32)], 6, seed=1)
    bank = Bank.build([template_from(timg, 32, 32, 12), template_from(timg, 32, 32, 14)], small_params())
    net = build_unet((4, 8))
    path = save_mcf_weights(tmp_path / "m.safetensors", bank, net, params={"unet": {"widths": [4, 8]}})
    method = build_method("mcf", weights=path)
    assert len(method.bank.templates) == 2
    np.testing.assert_array_equal(method.bank.filters[1][2], bank.filters[1][2])
    assert method.bank.params.norm_floor == pytest.approx(bank.params.norm_floor)
    img, _ = disc_image((50, 70), [(20, 20), (30, 50)], 6, rgb=True)
    res = method.segment(img[None])
    assert len(res) == 1 and res[0].labels.shape == (50, 70) and res[0].labels.dtype == np.int32
    # detection-only weights (the '-seg.' ablation) find both discs
    det_path = save_mcf_weights(tmp_path / "d.safetensors", bank, None)
    det = build_method("mcf", weights=det_path)
    assert det.p["mode"] == "detection"
    lab = det.segment(img[None])[0].labels
    assert lab.max() == 2 and lab[20, 20] > 0 and lab[30, 50] > 0


def test_weights_errors(tmp_path):
    from nucli.models.registry import build_method
    from nucli.models.weights_io import save_weights

    other = save_weights(tmp_path / "o.safetensors", {"x": torch.zeros(1)}, "watershed", {})
    with pytest.raises(WeightsError, match="not 'mcf'"):
        build_method("mcf", weights=other)
    broken = save_weights(tmp_path / "b.safetensors", {"x": torch.zeros(1)}, "mcf", {"params": {}})
    with pytest.raises(WeightsError, match="template bank is missing"):
        build_method("mcf", weights=broken)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError):
        build_method("mcf", weights=tmp_path / "junk.safetensors")


# ---------------------------------------------------------------- training smoke test
def test_train_mcf_smoke_and_resume(tmp_path):
    from nucli.models.mcf.complement import TrainSettings, train_mcf
    from nucli.models.mcf.templates import from_labels
    from nucli.models.registry import build_method

    d = make_labelled_dir(tmp_path / "set", n_images=3, size=(64, 72))
    tps = from_labels(d, n=2, seed=0)
    s = TrainSettings(rounds=2, seg_steps=(3,), self_steps=(2,), crop=32, batch=2, syn_batch=1, widths=(4, 8),
                      detector={"k": 2, "scale_span": 0.5})
    out = tmp_path / "run"
    summary = train_mcf(tps, d, out, weights_out=tmp_path / "w.safetensors", settings=s)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    rec = summary["rounds"][0]
    assert set(rec["train"]) >= {"detection", "pseudo", "segmentation_dice", "full", "detection_only"}
    assert 0.0 <= rec["train"]["detection"]["f1"] <= 1.0
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 2
    assert (out / "round2.safetensors").exists()
    m = build_method("mcf", weights=tmp_path / "w.safetensors")
    assert len(m.bank.templates) == summary["templates"]
    # a resumed run with everything done trains nothing more and keeps the bank
    again = train_mcf(tps, d, out, settings=s, resume=True)
    assert again["rounds"] == [] and again["templates"] == summary["templates"]


def test_train_mcf_needs_templates(tmp_path):
    from nucli.models.mcf.complement import train_mcf

    with pytest.raises(InputError, match="template"):
        train_mcf([], tmp_path, tmp_path / "o")


def test_registry_lists_mcf():
    from nucli.models.registry import available

    spec = available()["mcf"]
    assert spec.needs_weights and spec.config.name == "mcf"


# ---------------------------------------------------------------- CLI
def test_train_cli_mcf_needs_one_template_source(tmp_path):
    from typer.testing import CliRunner

    from nucli.cli import app

    d = make_labelled_dir(tmp_path / "set", n_images=1)
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--method", "mcf", "--data", str(d), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "--templates" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--method", "mcf", "--data", str(d), "-o", str(tmp_path / "out2"),
                              "--templates", str(tmp_path / "t.geojson"), "--from-labels", str(d)])
    assert res.exit_code == 1 and "one of them" in res.output
    (tmp_path / "t.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    res = runner.invoke(app, ["train", "--method", "mcf", "--data", str(d), "-o", str(tmp_path / "out3"),
                              "--templates", str(tmp_path / "t.geojson")])
    assert res.exit_code == 1 and "--template-image" in res.output


def test_export_detection_only(tmp_path):
    from nucli.models.mcf.bank import Bank
    from nucli.models.mcf.method import export_detection_only, save_mcf_weights
    from nucli.models.mcf.segnet import build_unet
    from nucli.models.registry import build_method
    from nucli.models.weights_io import load_weights

    timg, _ = disc_image((64, 64), [(32, 32)], 6, seed=1)
    bank = Bank.build([template_from(timg, 32, 32, 12)], small_params(k=1))
    full = save_mcf_weights(tmp_path / "f.safetensors", bank, build_unet((4, 8)), params={"unet": {"widths": [4, 8]}})
    det = export_detection_only(full, tmp_path / "d.safetensors")
    tensors, cfg = load_weights(det, "mcf")
    assert cfg["params"]["mode"] == "detection" and not any(k.startswith("unet.") for k in tensors)
    assert build_method("mcf", weights=det).unet is None
