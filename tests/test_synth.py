"""Style-consistent synthesis: deformation alignment, inpainting, HED composition, AdaIN, writer, training."""

from __future__ import annotations

import numpy as np
import pytest

from nucli.synth.deform import DeformParams, blur_mask, deform_instances

TINY = {"unet": {"widths": [4, 8]}, "refiner": {"channels": 4}, "discriminator": {"channels": 4, "layers": 2},
        "crop": 32, "batch": 2, "ae_steps": 2, "pre_steps": 2, "pool": 3}


def _discs(shape, centres, radii):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    lab = np.zeros(shape, np.int32)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        lab[((yy - cy) ** 2 + ((xx - cx) / 1.3) ** 2 <= r * r) & (lab == 0)] = k
    return lab


def _he_like(lab, rng):
    img = np.empty(lab.shape + (3,), np.float32)
    img[:] = (232, 215, 232)
    img[lab > 0] = (95, 45, 150)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def _write_dataset(root, n=3, size=64, seed=0):
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        lab = _discs((size, size), rng.integers(10, size - 10, (5, 2)), rng.integers(4, 8, 5))
        Image.fromarray(_he_like(lab, rng)).save(root / "images" / f"im{i}.png")
        tifffile.imwrite(root / "labels" / f"im{i}.tif", lab.astype(np.uint16))
    return root


# ---------------------------------------------------------------- deformation
def test_identity_deformation_returns_the_input():
    lab = _discs((60, 60), [(15, 15), (40, 40), (15, 45)], [6, 8, 5])
    img = np.random.default_rng(0).uniform(0, 255, (60, 60, 3)).astype(np.float32)
    p = DeformParams(scale_range=(1.0, 1.0), contour_amplitude=0.0, rotate=False)
    fg, new = deform_instances(img, lab, np.random.default_rng(1), p)
    assert new.dtype == np.int32 and new.shape == lab.shape
    assert np.array_equal(new > 0, lab > 0)
    # one new id per old id (ids may be renumbered)
    assert len({(a, b) for a, b in zip(lab[lab > 0], new[lab > 0])}) == 3
    assert np.allclose(fg[lab > 0], img[lab > 0], atol=1e-3) and not fg[lab == 0].any()


def test_deformation_keeps_labels_aligned_with_texture():
    from scipy import ndimage as ndi

    lab = _discs((96, 96), [(20, 20), (20, 70), (70, 25), (70, 72)], [8, 9, 7, 10])
    colour = np.array([0, 40, 90, 140, 200], np.float32)
    img = colour[lab]  # each nucleus its own gray value, background 0
    for seed in range(3):
        fg, new = deform_instances(img, lab, np.random.default_rng(seed),
                                   DeformParams(scale_range=(0.7, 1.4), contour_amplitude=0.25))
        assert new.max() >= 3
        assert not fg[new == 0].any() and (fg[new > 0] > 0).all()  # texture exactly where the labels are
        for k in range(1, new.max() + 1):
            core = ndi.binary_erosion(new == k)
            if core.any():  # inside each new nucleus, the texture of exactly one source nucleus
                vals = np.unique(np.round(fg[core]))
                assert len(vals) == 1 and vals[0] in colour[1:]


def test_deformation_changes_size_and_shape():
    lab = _discs((120, 120), [(30, 30), (30, 90), (90, 30), (90, 90)], [9, 9, 9, 9])
    img = (lab > 0).astype(np.float32)
    _, big = deform_instances(img, lab, np.random.default_rng(0), DeformParams(scale_range=(1.5, 1.5),
                                                                                contour_amplitude=0.0))
    assert (big > 0).sum() == pytest.approx(2.25 * (lab > 0).sum(), rel=0.15)
    _, bent = deform_instances(img, lab, np.random.default_rng(0), DeformParams(scale_range=(1.0, 1.0),
                                                                                 contour_amplitude=0.3))
    assert (bent > 0).sum() != (lab > 0).sum() or not np.array_equal(bent > 0, lab > 0)


def test_blur_mask_is_soft_and_centred_on_the_contour():
    lab = _discs((40, 40), [(20, 20)], [10])
    a = blur_mask(lab, 1.5)
    assert a.min() >= 0 and a.max() <= 1 and 0 < a[lab > 0].min() < 1
    assert (a[20, 20] > 0.99) and a[0, 0] < 0.01
    assert ((a > 0.5) == (lab > 0)).mean() > 0.97


# ---------------------------------------------------------------- background and composition
def test_inpainting_removes_nuclei_and_keeps_the_rest():
    from nucli.synth.background import inpaint_background

    lab = _discs((64, 64), [(20, 20), (44, 40)], [8, 10])
    img = np.full((64, 64, 3), 200, np.uint8)
    img[..., 2] = 220
    img[lab > 0] = (60, 30, 120)
    out = inpaint_background(img, lab > 0, rng=np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.float32
    assert np.abs(out[..., 0] - 200).max() < 1.0 and np.abs(out[..., 2] - 220).max() < 1.0
    assert img.min() == 30  # the input is not modified


def test_hed_composition_round_trip_and_blend():
    from nucli.synth.compose import ComposeParams, compose

    rng = np.random.default_rng(0)
    fg = rng.uniform(60, 200, (16, 16, 3)).astype(np.float32)
    bg = rng.uniform(180, 250, (16, 16, 3)).astype(np.float32)
    same = ComposeParams(nucleus_h_gain=(1, 1), nucleus_e_gain=(1, 1), background_e_gain=(1, 1),
                         background_h_gain=(1, 1), shift=0.0)
    ones, zeros = np.ones((16, 16), np.float32), np.zeros((16, 16), np.float32)
    assert np.abs(compose(bg, fg, ones, "hed", rng, same).astype(float) - fg).max() <= 1.5
    assert np.abs(compose(bg, fg, zeros, "hed", rng, same).astype(float) - bg).max() <= 1.5
    # a stronger hematoxylin gain darkens the nuclei
    strong = ComposeParams(nucleus_h_gain=(1.5, 1.5), nucleus_e_gain=(1, 1), shift=0.0)
    assert compose(bg, fg, ones, "hed", rng, strong).mean() < fg.mean() - 2


def test_pre_synthesis_gives_an_aligned_pair():
    from nucli.synth.compose import image_kind, pre_synthesize

    rng = np.random.default_rng(0)
    lab = _discs((80, 80), [(20, 20), (20, 60), (60, 20), (60, 60)], [7, 8, 6, 9])
    img = _he_like(lab, rng)
    assert image_kind(img) == "hed"
    out, new = pre_synthesize(img, lab, np.random.default_rng(3))
    assert out.dtype == np.uint8 and out.shape == img.shape and new.dtype == np.int32 and new.shape == lab.shape
    assert 2 <= new.max() <= 4
    lum = out.astype(float).mean(axis=2)
    assert lum[new > 0].mean() < lum[new == 0].mean() - 50  # nuclei are dark exactly where labelled
    with pytest.raises(Exception, match="do not match"):
        pre_synthesize(img, lab[:40], rng)


# ---------------------------------------------------------------- AdaIN
def test_adain_transfers_channel_statistics_and_losses_vanish_on_equal_inputs():
    torch = pytest.importorskip("torch")
    from nucli.synth.adain import StyleRefiner, adain, channel_stats, content_loss, style_loss

    c, s = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8) * 3 + 2
    y = adain(c, s)
    my, sy = channel_stats(y)
    ms, ss = channel_stats(s)
    assert torch.allclose(my, ms, atol=1e-4) and torch.allclose(sy, ss, atol=1e-3)
    feats = [torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4)]
    assert style_loss(feats, feats).item() == 0.0 and content_loss(feats, feats).item() == 0.0
    ref = StyleRefiner(4)
    out = ref(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1


def test_differentiable_gray_matches_the_inference_preprocessing():
    torch = pytest.importorskip("torch")
    from nucli.models.gensegnet.preprocess import normalize
    from nucli.synth.adversarial import segmenter_input

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2, 24, 24, 3)).astype(np.uint8)
    x = torch.from_numpy(imgs.transpose(0, 3, 1, 2).astype(np.float32) / 255.0).requires_grad_(True)
    got = segmenter_input(x, np.array([True, False]))
    for i, inv in enumerate([True, False]):
        assert np.abs(got[i, 0].detach().numpy() - normalize(imgs[i], invert=inv)).max() < 0.02
    got.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- writer and training
def test_writer_writes_valid_pairs_and_resumes(tmp_path):
    import tifffile
    from PIL import Image

    from nucli.synth.writer import write_synthetic_pairs

    data = _write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    res = write_synthetic_pairs(data, out, count=3, seed=1)
    assert res["written"] == 3
    names = sorted(p.stem for p in (out / "images").glob("*.png"))
    assert names == sorted(p.stem for p in (out / "labels").glob("*.tif")) and len(names) == 3
    for n in names:
        img = np.asarray(Image.open(out / "images" / f"{n}.png"))
        lab = tifffile.imread(out / "labels" / f"{n}.tif")
        assert img.dtype == np.uint8 and img.shape[2] == 3 and lab.shape == img.shape[:2] and lab.max() > 0
        assert img[lab > 0].mean() < img[lab == 0].mean()  # dark nuclei where labelled
    before = (out / "images" / f"{names[0]}.png").read_bytes()
    again = write_synthetic_pairs(data, out, count=3, seed=1)
    assert again["kept"] == 3 and again["written"] == 0
    redo = write_synthetic_pairs(data, out, count=3, seed=1, overwrite=True)
    assert redo["written"] == 3 and (out / "images" / f"{names[0]}.png").read_bytes() == before  # deterministic
    from nucli.errors import UsageError

    with pytest.raises(UsageError, match="differ from --data"):
        write_synthetic_pairs(data, data, count=1)


def test_three_step_training_with_and_without_synthesis(tmp_path):
    pytest.importorskip("torch")
    from nucli.errors import WeightsError
    from nucli.models.registry import build_method
    from nucli.synth.adversarial import load_refiner, train_with_synthesis
    from nucli.synth.writer import write_synthetic_pairs

    data = _write_dataset(tmp_path / "data")
    s = train_with_synthesis(data, tmp_path / "syn", synth=True, steps=3, threads=1, overrides=TINY)
    assert s["stages"]["joint"]["steps"] == 3 and s["stages"]["gd"]["steps"] == 2
    r = train_with_synthesis(data, tmp_path / "real", synth=False, steps=3, threads=1, overrides=TINY)
    assert r["stages"]["real"]["steps"] == 3
    for w in (tmp_path / "syn" / "gensegnet_synth.safetensors", tmp_path / "real" / "gensegnet_real.safetensors"):
        m = build_method("gensegnet", weights=w)
        assert m.config.params["generator"] is None
        assert m.segment(np.zeros((1, 40, 48, 3), np.uint8))[0].labels.shape == (40, 48)
    refiner = tmp_path / "syn" / "synth_refiner.safetensors"
    assert load_refiner(refiner).stride == 4
    res = write_synthetic_pairs(data, tmp_path / "refined", count=2, refiner_weights=refiner)
    assert res["refined"] and res["written"] == 2
    with pytest.raises(WeightsError, match="not 'synth-refiner'"):
        load_refiner(tmp_path / "real" / "gensegnet_real.safetensors")
    # resuming the finished run changes nothing
    again = train_with_synthesis(data, tmp_path / "syn", synth=True, steps=3, threads=1, overrides=TINY,
                                 resume=True)
    assert again["stages"]["joint"]["steps"] == 3


def test_cli_writes_pairs_and_refuses_bad_options(tmp_path):
    from typer.testing import CliRunner

    from nucli.cli import app

    data = _write_dataset(tmp_path / "data")
    out = tmp_path / "pairs"
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--method", "synth", "--data", str(data), "-o", str(out), "--count", "2",
                              "--quiet"])
    assert res.exit_code == 0, res.output
    assert len(list((out / "images").glob("*.png"))) == 2 and len(list((out / "labels").glob("*.tif"))) == 2
    res = runner.invoke(app, ["train", "--method", "synth", "--data", str(data), "-o", str(out), "--count", "2"])
    assert res.exit_code == 2 and "--resume" in res.output  # an existing output is not touched silently
    res = runner.invoke(app, ["train", "--method", "harunet", "--synth", "style", "--data", str(data), "-o",
                              str(tmp_path / "x")])
    assert res.exit_code == 1 and "gensegnet" in res.output and not (tmp_path / "x").exists()
    res = runner.invoke(app, ["train", "--method", "synth", "-o", str(tmp_path / "y")])
    assert res.exit_code == 1 and "--data" in res.output
