"""GeNSeg-Net colour input: gray + red + blue channels for brightfield colour images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nucli.models.gensegnet.preprocess import normalize, normalize_batch, normalize_channels

NUCLI = str(Path(sys.executable).with_name("nucli"))


def _he_tile(size=64, seed=0):
    """Pink stroma on the left half, a purple nucleus on the right half, white glass elsewhere."""
    rng = np.random.default_rng(seed)
    rgb = np.full((size, size, 3), (240, 238, 242), np.uint8)
    rgb[:, : size // 2] = (225, 120, 190)  # eosin: absorbs green
    yy, xx = np.mgrid[:size, :size]
    rgb[(yy - size // 2) ** 2 + (xx - 3 * size // 4) ** 2 <= 64] = (100, 80, 160)  # hematoxylin: absorbs red
    return np.clip(rgb.astype(int) + rng.integers(-3, 4, rgb.shape), 0, 255).astype(np.uint8)


def test_channels_of_a_brightfield_colour_image_are_gray_red_blue():
    rgb = _he_tile()
    x = normalize_channels(rgb, 3)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], normalize(rgb))
    nucleus, stroma = (32, 48), (32, 10)
    # luminance: the stroma is nearly as dark as the nucleus; red: the stroma is close to the glass
    assert x[0][stroma] > 0.5 * x[0][nucleus]
    assert x[1][stroma] < 0.25 * x[1][nucleus]
    assert x[1][nucleus] > 0.9


def test_gray_and_fluorescence_images_repeat_the_gray_channel():
    gray = np.where(np.random.default_rng(1).random((40, 50)) > 0.8, 200, 10).astype(np.uint8)  # fluorescence
    for img in (gray, np.stack([gray] * 3, -1), 255 - gray):
        x = normalize_channels(img, 3)
        np.testing.assert_array_equal(x[1], x[0])
        np.testing.assert_array_equal(x[2], x[0])
    one = normalize_channels(gray, 1)
    assert one.shape == (1, 40, 50)
    with pytest.raises(ValueError, match="1 or 3"):
        normalize_channels(gray, 2)
    b = normalize_batch(np.stack([_he_tile(), _he_tile(seed=2)]), 3)
    assert b.shape == (2, 3, 64, 64)
    assert normalize_batch(np.stack([_he_tile()]), 1).shape == (1, 64, 64)


def _gray_weights(path: Path) -> Path:
    """A gensegnet weights file with a 1-channel (gray-input) generator: the shipped weights' gray
    channel filter is the sum of their three input filters (what they apply to a gray image)."""
    import torch

    from nucli.models.registry import get_spec
    from nucli.models.weights_io import load_weights, save_weights

    tensors, cfg = load_weights(get_spec("gensegnet").weights_path, "gensegnet")
    tensors = dict(tensors)
    w = tensors["generator.head.0.weight"]
    tensors["generator.head.0.weight"] = w.sum(1, keepdim=True) if w.shape[1] != 1 else w
    cfg = json.loads(json.dumps(cfg))
    cfg["params"]["generator"].pop("in_channels", None)
    return save_weights(path, {k: torch.as_tensor(v) for k, v in tensors.items()}, "gensegnet", cfg)


def test_widened_generator_starts_as_the_stored_one_and_learns_colour_weights(tmp_path):
    from nucli.training.multiset_train import _load_init

    init = _gray_weights(tmp_path / "gray.safetensors")
    one, base1, make1 = _load_init("gensegnet", init)
    three, base, make3 = _load_init("gensegnet", init, 3)
    assert base["params"]["generator"]["in_channels"] == 3 and "in_channels" not in base1["params"]["generator"]
    assert three.generator.head[0].weight.shape[1] == 3
    assert float(three.generator.head[0].weight.detach()[:, 1:].abs().sum()) == 0.0
    tiles = np.stack([_he_tile(96)])
    a = make1(one.eval()).infer(tiles)
    b = make3(three.eval()).infer(tiles)
    assert np.abs(a - b).max() < 1e-4
    # the colour channels do change the output once their weights are not zero
    import torch

    with torch.no_grad():
        three.generator.head[0].weight[:, 1:] += 0.05
    c = make3(three.eval()).infer(tiles)
    assert np.abs(c - a).max() > 1e-3


def test_sampler_gives_three_channel_batches(tmp_path):
    from test_multiset import _he_image, _make_set

    from nucli.training import multiset as ms
    from nucli.training.multiset_train import _gensegnet_targets

    he = _make_set(tmp_path, "monuseg", _he_image, radius=10, mpp=0.25, modality="brightfield-color")
    loaded = ms.load_sets(ms.parse_data_args([he]))
    s = ms.MultiSetSampler(loaded, 48, 2, _gensegnet_targets, seed=0, channels=3)
    b = s.next()
    assert b["x"].shape == (2, 3, 48, 48) and b["cls"].shape == (2, 48, 48)
    for x, c in zip(b["x"], b["cls"]):
        if (c == 1).any() and (c == 0).any():
            assert x[1][c == 1].mean() > x[1][c == 0].mean() + 0.2  # nuclei bright in the red channel too


def test_train_cli_widens_to_colour_and_the_weights_load(tmp_path):
    from test_multiset import _disc_labels, _fluo_image, _he_image, _make_set

    from nucli.models.registry import build_method
    from nucli.models.weights_io import load_weights

    he = _make_set(tmp_path, "monuseg", _he_image, radius=10, mpp=0.25, modality="brightfield-color")
    fl = _make_set(tmp_path, "bitdepth_nucseg", _fluo_image, radius=16, mpp=None)
    out = tmp_path / "run"
    res = subprocess.run([NUCLI, "train", "--method", "gensegnet", "--data", str(he), "--data", str(fl),
                          "-o", str(out), "--steps", "2", "--batch", "1", "--threads", "1", "--input-channels", "3",
                          "--init", str(_gray_weights(tmp_path / "gray.safetensors")),
                          "--quiet", "--json"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    w = out / "gensegnet_multi.safetensors"
    tensors, cfg = load_weights(w, "gensegnet")
    assert cfg["params"]["generator"]["in_channels"] == 3
    assert tuple(tensors["generator.head.0.weight"].shape[:2]) == (16, 3)
    assert json.loads((out / "gensegnet_multi.json").read_text())["input_channels"] == 3
    m = build_method("gensegnet", weights=w)
    (res1,) = m.segment(_he_image(_disc_labels((96, 96), 10, 30))[None])
    assert res1.labels.shape == (96, 96)
    bad = subprocess.run([NUCLI, "train", "--method", "harunet", "--data", str(he), "--data", str(fl),
                          "-o", str(tmp_path / "h"), "--steps", "1", "--input-channels", "3"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "only gensegnet" in bad.stderr and "Traceback" not in bad.stderr


def test_shipped_weights_take_colour_and_a_mismatched_file_is_a_clear_error(tmp_path):
    import torch

    from nucli.errors import WeightsError
    from nucli.models.registry import build_method, get_spec
    from nucli.models.weights_io import load_weights, save_weights

    m = build_method("gensegnet")
    assert m.in_channels == 3
    tensors, cfg = load_weights(get_spec("gensegnet").weights_path, "gensegnet")
    cfg = json.loads(json.dumps(cfg))
    cfg["params"]["generator"]["in_channels"] = 1  # claims gray input, holds a 3-channel filter
    bad = save_weights(tmp_path / "bad.safetensors", {k: torch.as_tensor(v) for k, v in tensors.items()},
                       "gensegnet", cfg)
    with pytest.raises(WeightsError):
        build_method("gensegnet", weights=bad)
