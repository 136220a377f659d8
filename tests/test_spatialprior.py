"""spatialprior: losses, networks, data, post-processing, a 3-step training run and weight errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TINY = {"segmentor": {"widths": [4, 8]}, "reconstructor": {"widths": [4, 8]},
        "discriminator": {"channels": 4, "layers": 2}}


def _discs(shape, centres, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    lab = np.zeros(shape, np.int32)
    for k, (cy, cx) in enumerate(centres, start=1):
        lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (lab == 0)] = k
    return lab


def _write_unpaired(root, n=3, size=48, seed=0):
    """Unlabelled H&E-like RGB images and, separately, label images of other nuclei."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        lab = _discs((size, size), rng.integers(8, size - 8, (4, 2)), 5)
        img = np.full((size, size, 3), (235, 220, 235), np.uint8)
        img[lab > 0] = (90, 40, 140)
        Image.fromarray(img).save(root / "images" / f"t{i}.png")
        other = _discs((size + 16, size + 16), rng.integers(8, size + 8, (5, 2)), 6)
        tifffile.imwrite(root / "masks" / f"m{i}.tif", other.astype(np.uint16))
    return root / "images", root / "masks"


# ---------------------------------------------------------------- losses
def test_lsgan_targets():
    from nucli.training.spatialprior import lsgan_loss

    ones, zeros = torch.ones(2, 1, 5, 5), torch.zeros(2, 1, 5, 5)
    assert lsgan_loss(ones, True).item() == 0.0
    assert lsgan_loss(zeros, False).item() == 0.0
    assert lsgan_loss(zeros, True).item() == pytest.approx(1.0)
    assert lsgan_loss(ones, False).item() == pytest.approx(1.0)
    assert lsgan_loss(torch.full((3,), 0.5), True).item() == pytest.approx(0.25)


def test_consistency_loss_zero_for_identical_views_and_positive_otherwise():
    from nucli.training.spatialprior import consistency_loss

    a = torch.rand(2, 1, 8, 8)
    assert consistency_loss(a, a.clone()).item() == 0.0
    b = a.clone()
    b[0, 0, 0, 0] += 1.0
    assert consistency_loss(a, b).item() == pytest.approx(1.0 / a.numel())


def test_sharpening_saturates_small_logits():
    from nucli.training.spatialprior import sharpen

    s = sharpen(torch.tensor([-0.1, 0.0, 0.1]), 60.0)
    assert s[0] < 0.01 and s[1] == pytest.approx(0.5) and s[2] > 0.99
    assert torch.sigmoid(torch.tensor(0.1)) < 0.53  # without sharpening it is far from binary


def test_colour_augment_keeps_range_and_differs_between_views():
    from nucli.training.spatialprior import colour_augment

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16)
    a, b = colour_augment(x, g), colour_augment(x, g)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert (a - b).abs().mean() > 1e-3


def test_network_shapes():
    from nucli.training.spatialprior import PRESETS, build_networks

    s, r, ds, dr = build_networks(PRESETS["cpu"])
    x = torch.rand(2, 3, 64, 64)
    logits = s(x)
    assert logits.shape == (2, 1, 64, 64)
    assert r(torch.sigmoid(logits)).shape == (2, 3, 64, 64)
    patches = ds(torch.rand(2, 1, 64, 64))
    assert patches.shape[:2] == (2, 1) and patches.shape[-1] > 1  # one score per patch, not per image
    assert dr(x).shape == patches.shape


# ---------------------------------------------------------------- data
def test_prior_masks_part_touching_nuclei():
    from scipy import ndimage as ndi

    from nucli.training.spatialprior import mask_from_labels

    lab = np.zeros((20, 30), np.int32)
    lab[5:15, 3:15] = 1
    lab[5:15, 15:27] = 2  # touches nucleus 1
    lab[0:3, 0:3] = 3
    m = mask_from_labels(lab)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    assert ndi.label(m)[1] == 3  # a plain binarisation would give 2
    assert m[lab == 0].sum() == 0 and m[8:12, 5:12].all()


def test_sampler_shapes_rescaling_and_resume():
    from nucli.training.spatialprior import UnpairedSampler

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8) for _ in range(2)]
    masks = [(rng.random((30, 30)) > 0.5).astype(np.uint8)]
    s = UnpairedSampler(images, masks, crop=32, batch=3, scale=0.5, spread=1.2, seed=1)
    state = s.state()
    b = s.next()
    assert b["t"].shape == (3, 3, 32, 32) and b["m"].shape == (3, 1, 32, 32)
    assert 0 <= b["t"].min() and b["t"].max() <= 1 and set(np.unique(b["m"])) <= {0.0, 1.0}
    s.set_state(state)
    again = s.next()
    assert np.array_equal(b["t"], again["t"]) and np.array_equal(b["m"], again["m"])


def test_pseudo_pair_sampler_keeps_image_and_mask_aligned():
    from nucli.training.spatialprior import PseudoPairSampler

    rng = np.random.default_rng(1)
    lab = _discs((80, 96), rng.integers(8, 72, (12, 2)), 6)
    img = np.full((80, 96, 3), 230, np.uint8)
    img[lab > 0] = (60, 30, 120)
    mask = (lab > 0).astype(np.uint8)
    exact = PseudoPairSampler([img], [mask], crop=32, batch=6, scale=1.0, spread=1.0, seed=0).next()
    assert exact["t"].shape == (6, 3, 32, 32) and exact["m"].shape == (6, 1, 32, 32)
    # no rescaling: the mask is exactly the dark pixels of the same crop, after the same flip/rotation
    np.testing.assert_array_equal(exact["m"][:, 0] > 0.5, exact["t"][:, 0] < 0.5)
    # with rescaling the two differ only along contours (bilinear image vs nearest mask)
    scaled = PseudoPairSampler([img], [mask], crop=32, batch=6, scale=1.3, spread=1.2, seed=0).next()
    assert np.mean((scaled["m"][:, 0] > 0.5) != (scaled["t"][:, 0] < 0.5)) < 0.05


def test_warm_start_fits_pseudo_masks_and_is_cached(tmp_path):
    from nucli.training.spatialprior import PRESETS, PseudoPairSampler, build_networks, sharpen, warm_start

    rng = np.random.default_rng(2)
    lab = _discs((64, 64), rng.integers(8, 56, (6, 2)), 6)
    img = np.full((64, 64, 3), 230, np.uint8)
    img[lab > 0] = (60, 30, 120)
    mask = (lab > 0).astype(np.uint8)
    torch.manual_seed(0)
    S = build_networks({**PRESETS["cpu"], **TINY})[0]
    pairs = PseudoPairSampler([img], [mask], crop=32, batch=4, seed=0)
    x = torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1)[None] / 255.0)

    def err():
        with torch.inference_mode():
            return float((sharpen(S(x), 60.0)[0, 0].numpy() > 0.5).astype(np.float32).__ne__(mask).mean())

    before = err()
    info = warm_start(S, pairs, steps=40, lr=5e-3, out_dir=tmp_path)
    assert info["steps"] == 40 and (tmp_path / "sp.warm.safetensors").exists()
    assert err() < min(before, 0.15)
    log = [json.loads(line) for line in (tmp_path / "sp.log.jsonl").read_text().splitlines()]
    assert log[-1]["stage"] == "warm" and log[-1]["step"] == 40
    # a second call loads the cached result instead of training again
    S2 = build_networks({**PRESETS["cpu"], **TINY})[0]
    assert warm_start(S2, pairs, steps=40, lr=5e-3, out_dir=tmp_path)["cached"]
    assert all(torch.equal(a, b) for a, b in zip(S.state_dict().values(), S2.state_dict().values()))


def test_bad_inputs_are_clear_errors(tmp_path):
    from nucli.errors import InputError
    from nucli.training.spatialprior import load_prior_masks, load_unlabelled

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_unlabelled(tmp_path / "empty")
    with pytest.raises(InputError, match="not a folder"):
        load_unlabelled(tmp_path / "missing")
    with pytest.raises(InputError, match="no label or mask images"):
        load_prior_masks(tmp_path / "empty")
    import tifffile

    (tmp_path / "zeros").mkdir()
    tifffile.imwrite(tmp_path / "zeros" / "z.tif", np.zeros((8, 8), np.uint16))
    with pytest.raises(InputError, match="every mask is empty"):
        load_prior_masks(tmp_path / "zeros")


# ---------------------------------------------------------------- post-processing
def test_postprocess_median_removes_specks_and_watershed_splits():
    from nucli.models.spatialprior import PostprocessParams, instances_from_prob

    lab = _discs((64, 64), [(20, 20), (20, 31), (48, 48)], 7)  # first two touch
    prob = (lab > 0).astype(np.float32)
    rng = np.random.default_rng(0)
    specks = rng.random(prob.shape) > 0.995
    prob[specks & (lab == 0)] = 1.0
    out = instances_from_prob(prob, PostprocessParams())
    assert out.dtype == np.int32 and out.shape == prob.shape
    assert out.max() == 3
    assert not out[specks & (lab == 0)].any() or out[specks & (lab == 0)].sum() == 0
    eroded = instances_from_prob(prob, PostprocessParams(erosion=2))
    assert (eroded > 0).sum() < (out > 0).sum()


# ---------------------------------------------------------------- training smoke + weights
def test_three_step_training_writes_loadable_weights_and_resumes(tmp_path):
    from nucli.models.registry import build_method
    from nucli.training.spatialprior import train_spatialprior

    images, masks = _write_unpaired(tmp_path / "data")
    out = tmp_path / "run"
    summary = train_spatialprior(images, masks, out, steps=3, crop=32, batch=2, threads=1, overrides=TINY)
    assert summary["run"]["steps"] == 3
    assert summary["warm_start"]["steps"] == 1  # at most a fifth of the joint steps, at least one
    weights = out / "spatialprior_cpu.safetensors"
    assert weights.exists() and (out / "sp.ckpt.safetensors").exists()
    log = [json.loads(line) for line in (out / "sp.log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and {"system", "rec", "cons", "d_s", "g_adv_s"} <= set(log[-1])
    info = json.loads((out / "spatialprior_cpu.json").read_text())
    assert info["scale"]["scale"] > 0 and info["config"]["params"]["segmentor"]["widths"] == [4, 8]
    method = build_method("spatialprior", weights=weights)
    assert method.config.params["scale"] == pytest.approx(info["scale"]["scale"])
    res = method.segment(np.full((2, 40, 56, 3), 200, np.uint8))
    assert len(res) == 2 and res[0].labels.shape == (40, 56) and res[0].labels.dtype == np.int32
    # resuming a finished run trains nothing more
    before = (out / "sp.best.safetensors").read_bytes()
    again = train_spatialprior(images, masks, out, steps=3, crop=32, batch=2, threads=1, overrides=TINY,
                               resume=True)
    assert again["run"]["steps"] == 3
    assert (out / "sp.best.safetensors").read_bytes() == before


def test_wrong_weights_are_clear_errors(tmp_path, monkeypatch):
    import dataclasses

    from nucli.errors import WeightsError
    from nucli.models import registry
    from nucli.models.registry import build_method
    from nucli.models.spatialprior import CONFIG
    from nucli.models.weights_io import save_weights

    spec = registry.get_spec("spatialprior")
    monkeypatch.setitem(registry._REGISTRY, "spatialprior",
                        dataclasses.replace(spec, weights_file="not_installed.safetensors"))
    with pytest.raises(WeightsError, match="nucli train --method spatialprior"):
        build_method("spatialprior")  # no weights installed and none given
    other = save_weights(tmp_path / "other.safetensors", {"x": torch.zeros(2)}, "gensegnet", {})
    with pytest.raises(WeightsError, match="not 'spatialprior'"):
        build_method("spatialprior", weights=other)
    cfg = CONFIG.to_dict()
    cfg["params"] = {**cfg["params"], "segmentor": {"widths": [8, 16]}}
    wrong = save_weights(tmp_path / "wrong.safetensors", {"segmentor.out.weight": torch.zeros(1, 4, 1, 1)},
                         "spatialprior", cfg)
    with pytest.raises(WeightsError, match="does not fit"):
        build_method("spatialprior", weights=wrong)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        build_method("spatialprior", weights=junk)


def test_cli_train_spatialprior_and_option_errors(tmp_path):
    from typer.testing import CliRunner

    from nucli.cli import app

    images, masks = _write_unpaired(tmp_path / "data")
    out = tmp_path / "cli"
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--method", "spatialprior", "--images", str(images), "--prior-masks",
                              str(masks), "-o", str(out), "--steps", "2", "--scale", "1.0", "--threads", "1",
                              "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["steps"] == 2
    assert (out / "spatialprior_cpu.safetensors").exists() and (out / "spatialprior_cpu.md").exists()
    # missing inputs: one-line usage error, nothing created
    res = runner.invoke(app, ["train", "--method", "spatialprior", "--images", str(images), "-o",
                              str(tmp_path / "none")])
    assert res.exit_code == 1 and "--prior-masks" in res.output and not (tmp_path / "none").exists()
    # the gensegnet-only preset: a usage error before anything is created
    res = runner.invoke(app, ["train", "--method", "spatialprior", "--images", str(images), "--prior-masks",
                              str(masks), "--preset", "cpu-long", "-o", str(tmp_path / "long")])
    assert res.exit_code == 1 and "cpu-long" in res.output and not (tmp_path / "long").exists()
    res = runner.invoke(app, ["train", "--method", "spatialprior", "--images", str(tmp_path / "missing"),
                              "--prior-masks", str(masks), "-o", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "not a folder" in res.output and "Traceback" not in res.output
