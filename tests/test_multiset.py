"""Training on several sets at one working scale: loading, scale, balance, stain augmentation, evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from nucli.training import multiset as ms
from nucli.training.stain_aug import hed_augment, stain_concentrations

NUCLI = str(Path(__import__("sys").executable).with_name("nucli"))


def _disc_labels(shape, radius, spacing, rng=None):
    h, w = shape
    lab = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:h, :w]
    n = 0
    for cy in range(radius + 2, h - radius - 2, spacing):
        for cx in range(radius + 2, w - radius - 2, spacing):
            n += 1
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius] = n
    return lab


def _he_image(lab):
    rgb = np.full(lab.shape + (3,), (235, 215, 230), np.uint8)  # pale pink background
    rgb[lab > 0] = (90, 60, 150)  # hematoxylin-purple nuclei
    return rgb


def _fluo_image(lab):
    g = np.where(lab > 0, 200, 15).astype(np.uint8)
    return g


def _make_set(root: Path, name: str, image_fn, radius: int, mpp=None, n_train=3, n_val=2, size=96,
              modality="fluorescence") -> Path:
    d = root / name
    rows = []
    for split, n in (("train", n_train), ("val", n_val)):
        (d / split / "images").mkdir(parents=True)
        (d / split / "labels").mkdir(parents=True)
        for i in range(n):
            lab = _disc_labels((size, size), radius, 3 * radius)
            iid = f"{name}_{split}_{i}"
            Image.fromarray(image_fn(lab)).save(d / split / "images" / f"{iid}.png")
            tifffile.imwrite(d / split / "labels" / f"{iid}.tif", lab.astype(np.uint16))
            rows.append({"id": iid, "split": split, "modality": modality, "mpp": mpp})
    (d / "index.json").write_text(json.dumps(rows))
    return d


@pytest.fixture()
def sets(tmp_path):
    he = _make_set(tmp_path, "monuseg", _he_image, radius=10, mpp=0.25, modality="brightfield-color")
    fl = _make_set(tmp_path, "bitdepth_nucseg", _fluo_image, radius=16, mpp=None)
    return he, fl


def test_scale_by_pixel_size_and_by_nucleus_size(sets):
    he, fl = sets
    loaded = ms.load_sets(ms.parse_data_args([he, fl]))
    h, f = loaded
    # pixel size: 0.25 -> 0.35 um/px
    assert h.train[0].how == "mpp"
    assert h.train[0].factor == pytest.approx(0.25 / ms.WORKING_MPP)
    assert h.train[0].labels.shape == (round(96 * 0.25 / 0.35),) * 2
    # no pixel size: the annotated median nucleus is brought to the reference diameter
    assert f.train[0].how == "nuclei"
    d_src = ms.median_diameter(tifffile.imread(fl / "train" / "labels" / "bitdepth_nucseg_train_0.tif"))
    assert f.train[0].factor == pytest.approx(ms.REFERENCE_DIAMETER_PX / d_src)
    assert ms.median_diameter(f.train[0].labels) == pytest.approx(ms.REFERENCE_DIAMETER_PX, rel=0.12)
    # images and labels stay aligned after resampling: nuclei are the dark (H&E) / bright (fluo) pixels
    for img in (h.train[0], f.train[0]):
        gray = img.rgb.mean(axis=2)
        inside, outside = gray[img.labels > 0].mean(), gray[img.labels == 0].mean()
        assert abs(inside - outside) > 60
    # the val images keep their labels at the source resolution for scoring
    assert h.val[0].source_labels is not None and h.val[0].source_labels.shape == (96, 96)


def test_scale_factor_is_clamped_and_handles_empty_labels():
    assert ms.scale_factor(0.01, np.zeros((4, 4), int)) == (ms.MIN_FACTOR, "mpp")
    assert ms.scale_factor(None, np.zeros((4, 4), int)) == (1.0, "none")
    tiny = np.zeros((50, 50), int)
    tiny[10:12, 10:12] = 1
    assert ms.scale_factor(None, tiny)[0] == ms.MAX_FACTOR


def test_balanced_sampling_follows_set_and_modality_weights(tmp_path, sets):
    he, fl = sets
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"path": str(he), "weight": 3}, {"path": str(fl), "weight": 1}]))
    loaded = ms.load_sets(ms.parse_data_args([manifest]))
    sampler = ms.MultiSetSampler(loaded, 64, 2, lambda lab: {}, seed=1)
    counts = {"monuseg": 0, "bitdepth_nucseg": 0}
    for _ in range(2000):
        counts[sampler.draw().set] += 1
    assert counts["monuseg"] / 2000 == pytest.approx(0.75, abs=0.04)
    assert sampler.probabilities() == {"monuseg": {"brightfield-color": 0.75},
                                       "bitdepth_nucseg": {"fluorescence": 0.25}}


def test_modalities_within_a_set_are_balanced_by_square_root(tmp_path):
    d = _make_set(tmp_path, "mix", _fluo_image, radius=8, n_train=9, n_val=1)
    rows = json.loads((d / "index.json").read_text())
    for r in rows:  # one of nine training images is brightfield
        if r["id"] == "mix_train_0":
            r["modality"] = "brightfield-gray"
    (d / "index.json").write_text(json.dumps(rows))
    loaded = ms.load_sets(ms.parse_data_args([d]))
    p = ms.MultiSetSampler(loaded, 32, 1, lambda lab: {}).probabilities()["mix"]
    assert p["brightfield-gray"] == pytest.approx(1 / (1 + 8 ** 0.5), abs=1e-3)


def test_weight_zero_is_validation_only_and_bad_data_is_a_clear_error(tmp_path, sets):
    he, fl = sets
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"path": str(he), "weight": 1}, {"path": str(fl), "weight": 0}]))
    loaded = ms.load_sets(ms.parse_data_args([manifest]))
    sampler = ms.MultiSetSampler(loaded, 32, 1, lambda lab: {})
    assert {sampler.draw().set for _ in range(50)} == {"monuseg"}
    assert set(ms.val_images(loaded, 64)) == {"monuseg", "bitdepth_nucseg"}
    from nucli.errors import InputError, UsageError

    with pytest.raises(InputError, match="train/images"):
        ms.parse_data_args([tmp_path])
    with pytest.raises(UsageError, match="twice"):
        ms.parse_data_args([he, he])


def test_sampler_crops_keep_targets_aligned_and_resume_identically(sets):
    from nucli.training.multiset_train import _gensegnet_targets

    loaded = ms.load_sets(ms.parse_data_args(list(sets)))
    a = ms.MultiSetSampler(loaded, 48, 3, _gensegnet_targets, seed=5)
    b1 = a.next()
    assert b1["x"].shape == (3, 1, 48, 48) and b1["cls"].shape == (3, 48, 48)
    assert b1["ideal"].shape == (3, 1, 48, 48)
    # nuclei are bright in the normalised input wherever the class map says body
    for x, c in zip(b1["x"][:, 0], b1["cls"]):
        if (c == 1).any() and (c == 0).any():
            assert x[c == 1].mean() > x[c == 0].mean() + 0.2
    state = a.state()
    nxt = a.next()
    b = ms.MultiSetSampler(loaded, 48, 3, _gensegnet_targets, seed=99)
    b.set_state(state)
    again = b.next()
    np.testing.assert_array_equal(nxt["x"], again["x"])
    np.testing.assert_array_equal(nxt["cls"], again["cls"])


def test_hed_augmentation_changes_colours_only_and_keeps_labels_aligned():
    lab = _disc_labels((80, 80), 8, 24)
    rgb = _he_image(lab)
    rng = np.random.default_rng(0)
    seen_ihc = False
    for _ in range(12):
        out, ihc = hed_augment(rgb, lab, rng, p_ihc=0.5)
        assert out.shape == rgb.shape and out.dtype == np.uint8
        seen_ihc |= ihc
        gray = out.astype(float).mean(axis=2)
        # nuclei stay darker than the background in every augmented crop: labels still mark them
        assert gray[lab > 0].mean() < gray[lab == 0].mean() - 30
    assert seen_ihc


def test_simulated_ihc_stains_some_annotated_nuclei_brown():
    lab = _disc_labels((120, 120), 8, 24)
    rgb = _he_image(lab)
    rng = np.random.default_rng(3)
    for _ in range(50):
        out, ihc = hed_augment(rgb, lab, rng, p_ihc=1.0)
        dab = stain_concentrations(out).reshape(out.shape[:2] + (3,))[..., 2]
        per_nucleus = np.array([dab[lab == i].mean() for i in range(1, lab.max() + 1)])
        if (per_nucleus > 0.15).any():
            break
    assert ihc
    assert (per_nucleus > 0.15).any(), "some nuclei are DAB-positive"
    assert dab[lab == 0].mean() < 0.1, "background stays free of DAB"
    e = stain_concentrations(out).reshape(out.shape[:2] + (3,))[..., 1]
    e0 = stain_concentrations(rgb).reshape(rgb.shape[:2] + (3,))[..., 1]
    assert e[lab == 0].mean() < e0[lab == 0].mean()  # eosin counterstain mostly removed


def test_auto_scale_shrinks_large_nuclei_for_weights_with_a_working_scale():
    from nucli.autoscale import estimate_for, ratio_for, zoom_for
    from nucli.models.base import MethodConfig

    old = MethodConfig(name="gensegnet", mpp=0.5, nucleus_diameter_px=19.0, params={})
    new = MethodConfig(name="gensegnet", mpp=0.35, nucleus_diameter_px=17.0,
                       params={"auto_scale": {"ratio": 1.0, "shrink": True}})
    big = _disc_labels((400, 400), 20, 44)  # 41 px nuclei
    assert ratio_for(new) == 1.0
    est = estimate_for(new, [big])
    assert est.zoom == pytest.approx(0.5)  # 17 / 40 = 0.425 -> nearest rung on a log scale: 0.5
    assert estimate_for(old, [big]).zoom == 1.0  # older weights never shrink
    assert zoom_for(8.5, 50, 17.0, shrink=True) == 2.0
    assert zoom_for(17.0, 50, 17.0, shrink=True) == 1.0


def test_segment_image_auto_shrinks_and_returns_labels_at_the_image_size():
    from nucli.autoscale import segment_image_auto
    from nucli.models.base import MethodConfig, TileResult

    class Fake:
        config = MethodConfig(name="fake", mpp=0.35, nucleus_diameter_px=17.0,
                              params={"auto_scale": {"ratio": 1.0}})
        sizes: list = []

        def segment(self, tiles):
            t = np.asarray(tiles)[0]
            self.sizes.append(t.shape[:2])
            return [TileResult(labels=_label_bright(t))]

    lab = _disc_labels((300, 300), 20, 44)
    rgb = np.repeat(_fluo_image(lab)[..., None], 3, axis=2)
    m = Fake()
    out, est = segment_image_auto(m, rgb)
    assert est.zoom < 1
    assert m.sizes[1][0] < 300  # second pass on the shrunk image
    assert out.shape == (300, 300)
    assert len(np.unique(out)) - 1 == lab.max()


def _label_bright(t):
    from skimage.measure import label

    return label(t[..., 0] > 100).astype(np.int32)


def test_evaluate_uses_index_pixel_size_and_reports_several_sets(sets, tmp_path):
    import subprocess

    he, fl = sets
    out = tmp_path / "r.json"
    res = subprocess.run([NUCLI, "evaluate", "--dataset", str(he / "val"), "--dataset",
                          str(fl / "val"), "--method", "watershed", "-o", str(out), "--csv", str(tmp_path / "r.csv")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "mean over sets" in res.stdout and "monuseg/val" in res.stdout and "bitdepth_nucseg/val" in res.stdout
    data = json.loads(out.read_text())
    per = {s["set"]: s["mean_over_images"]["aji"] for s in data["sets"]}
    assert data["mean_over_sets"]["aji"] == pytest.approx((per["monuseg/val"] + per["bitdepth_nucseg/val"]) / 2)
    he_report = data["reports"][0]
    assert he_report["pixel_size_from_index"]["images"] == 2
    assert he_report["pixel_size_from_index"]["median_zoom"] == pytest.approx(0.25 / 0.5, abs=1e-3)
    assert "pixel_size_from_index" not in data["reports"][1]
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0].startswith("set,n_images,") and rows[-1].startswith("mean over sets,4,")
    # -- one set at a time is unchanged; --save-predictions takes one set
    res = subprocess.run([NUCLI, "evaluate", "--dataset", str(he / "val"), "--dataset",
                          str(fl / "val"), "--save-predictions", str(tmp_path / "p")], capture_output=True, text=True)
    assert res.returncode != 0 and "one --dataset" in res.stderr and "Traceback" not in res.stderr


def test_train_cli_several_sets_smoke(sets, tmp_path):
    """Two steps of the multi-set fine-tune from the shipped weights: weights with a working scale come out."""
    import subprocess

    from nucli.models.weights_io import load_weights

    he, fl = sets
    out = tmp_path / "run"
    res = subprocess.run([NUCLI, "train", "--method", "harunet", "--data", str(he), "--data",
                          str(fl), "-o", str(out), "--steps", "2", "--batch", "1", "--threads", "1", "--quiet",
                          "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["steps"] == 2
    _, cfg = load_weights(out / "harunet_multi.safetensors", "harunet")
    assert cfg["mpp"] == ms.WORKING_MPP and cfg["params"]["working_scale"]["mpp"] == ms.WORKING_MPP
    assert cfg["params"]["training_sets"] == ["bitdepth_nucseg", "monuseg"]
    assert math.isfinite(json.loads((out / "harunet_multi.json").read_text())["val_objective"])
    res = subprocess.run([NUCLI, "train", "--method", "mcf", "--data", str(he), "--data",
                          str(fl), "-o", str(tmp_path / "x")], capture_output=True, text=True)
    assert res.returncode != 0 and "gensegnet and harunet" in res.stderr and "Traceback" not in res.stderr
