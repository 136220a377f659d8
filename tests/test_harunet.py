"""HARU-Net: network shapes, targets, loss, Algorithm-1 post-processing, method wiring."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nucli.errors import WeightsError  # noqa: E402
from nucli.models.harunet import NAME, build_network, pad_to_stride  # noqa: E402
from nucli.models.harunet.postprocess import grow_into, instances_from_maps, relabel  # noqa: E402
from nucli.training.harunet_loss import HARUNetLoss, dice_loss  # noqa: E402
from nucli.training.harunet_targets import contour_map, make_targets  # noqa: E402


def _disc(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _two_touching_discs(shape=(64, 100)):
    a = _disc(shape, (32, 34), 16)
    b = _disc(shape, (32, 62), 16) & ~a  # overlapping discs: b loses the shared lens to a
    labels = np.zeros(shape, np.int32)
    labels[a] = 1
    labels[b] = 2
    return labels


# ---------------------------------------------------------------- network


def test_network_dual_branch_six_sides_and_any_padded_size():
    torch.manual_seed(0)
    net = build_network("cpu").eval()
    img = np.random.default_rng(0).random((2, 70, 45)).astype(np.float32)
    padded, (h, w) = pad_to_stride(img)
    assert padded.shape == (2, 96, 64) and (h, w) == (70, 45)
    assert np.array_equal(padded[:, :70, :45], img)
    with torch.no_grad():
        fused, sides = net(torch.from_numpy(padded[:, None]))
    assert fused.shape == (2, 2, 96, 64)
    assert sides.shape == (2, 6, 2, 96, 64)
    assert torch.isfinite(fused).all() and torch.isfinite(sides).all()


def test_attention_is_channel_only_at_the_deepest_skip():
    from nucli.models.harunet.network import CBAM, ChannelAttention

    net = build_network("cpu")
    kinds = [type(a) for a in net.attn]  # decoder levels 5 (deepest) .. 1
    assert kinds[0] is ChannelAttention
    assert all(k is CBAM for k in kinds[1:])
    assert len(net.side["mask"]) == len(net.side["contour"]) == 6


def test_paper_preset_has_the_paper_widths():
    net = build_network("paper")
    n = sum(p.numel() for p in net.parameters())
    assert 40e6 < n < 50e6  # U²-Net-sized backbone (~44 M)
    assert net.encoders[0].conv_in.conv.out_channels == 64
    assert net.encoders[3].conv_in.conv.out_channels == 512
    small = sum(p.numel() for p in build_network("cpu").parameters())
    assert small < n / 100


def test_unknown_preset_is_a_usage_error():
    from nucli.errors import UsageError

    with pytest.raises(UsageError, match="preset"):
        build_network("huge")


# ---------------------------------------------------------------- targets


def test_targets_foreground_and_contour_split_touching_nuclei():
    from scipy import ndimage as ndi

    labels = _two_touching_discs()
    t = make_targets(labels)
    assert t.shape == (2, *labels.shape) and t.dtype == np.float32
    assert np.array_equal(t[0] > 0, labels > 0)
    inner = (t[0] > 0) & (t[1] == 0)
    _, n = ndi.label(inner, structure=np.ones((3, 3)))
    assert n == 2  # the contour cuts the seam
    # thickened: the contour is wider than a 1-px boundary and covers every instance edge
    thin = contour_map(labels, thickness=0)
    thick = contour_map(labels, thickness=1)
    assert thick.sum() > 2 * thin.sum()
    assert np.all(thick[thin > 0] == 1)


def test_targets_of_empty_labels_are_empty():
    t = make_targets(np.zeros((20, 30), np.uint16))
    assert t.shape == (2, 20, 30) and t.sum() == 0


# ---------------------------------------------------------------- loss


def test_loss_is_low_for_the_truth_and_reaches_every_side_output():
    torch.manual_seed(0)
    target = torch.from_numpy(make_targets(_two_touching_discs()))[None]
    good = (target * 2 - 1) * 20.0
    loss_fn = HARUNetLoss()
    low, parts = loss_fn(good, good[:, None].repeat(1, 6, 1, 1, 1), target)
    bad = -good
    high, _ = loss_fn(bad, bad[:, None].repeat(1, 6, 1, 1, 1), target)
    assert float(low) < 0.05 < 10.0 < float(high)
    assert set(parts) == {"mask", "contour", "sides"}

    net = build_network("cpu")
    x = torch.rand(1, 1, 64, 96)
    fused, sides = net(x)
    loss, _ = loss_fn(fused, sides, target[..., :64, :96])
    loss.backward()
    for b in ("mask", "contour"):
        for conv in net.side[b]:
            assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        assert net.fuse[b].fc[0].weight.grad.abs().sum() > 0


def test_dice_uses_squared_denominator():
    logits = torch.zeros(1, 4, 4)  # p = 0.5 everywhere
    target = torch.ones(1, 4, 4)
    expected = 1 - (2 * 8 + 1) / (16 * 0.25 + 16 + 1)
    assert float(dice_loss(logits, target)) == pytest.approx(expected, rel=1e-6)


def test_loss_rejects_mismatched_side_weights():
    with pytest.raises(ValueError, match="side"):
        HARUNetLoss(w_side=(1.0,) * 5)(torch.zeros(1, 2, 8, 8), torch.zeros(1, 6, 2, 8, 8), torch.zeros(1, 2, 8, 8))


# ---------------------------------------------------------------- post-processing


def test_two_touching_discs_separated_by_contour_become_two_full_instances():
    labels = _two_touching_discs()
    fg = (labels > 0).astype(np.float32)
    contour = contour_map(labels, thickness=1).astype(np.float32)
    out = instances_from_maps(fg, contour)
    assert out.dtype == np.int32
    assert out.max() == 2
    # every foreground pixel is restored, nothing outside it
    assert np.array_equal(out > 0, labels > 0)
    for k in (1, 2):
        truth = labels == k
        best = np.bincount(out[truth]).argmax()
        pred = out == best
        iou = (pred & truth).sum() / (pred | truth).sum()
        assert iou > 0.95, iou
    # the seeds alone (foreground minus contour) were much smaller than the restored instances
    seeds = (fg > 0) & (contour == 0)
    assert seeds.sum() < 0.8 * (labels > 0).sum()


def test_growth_stays_inside_foreground_and_does_not_jump_gaps():
    fg = np.zeros((20, 40), bool)
    fg[5:15, 2:15] = True
    fg[5:15, 25:38] = True  # separate piece without a seed
    seeds = np.zeros(fg.shape, np.int32)
    seeds[9:11, 7:9] = 1
    grown = grow_into(seeds, fg)
    assert np.array_equal(grown == 1, fg & (np.arange(40)[None, :] < 20))
    assert not grown[:, 25:38].any()
    # the full pipeline keeps the unseeded piece as its own instance
    prob_fg = fg.astype(np.float32)
    contour = np.ones(fg.shape, np.float32)
    contour[9:11, 7:9] = 0
    out = instances_from_maps(prob_fg, contour, min_seed_area=1, min_area=1)
    assert out.max() == 2 and np.array_equal(out > 0, fg)


def test_many_instances_grow_in_one_vectorised_pass():
    from skimage.draw import disk

    rng = np.random.default_rng(3)
    labels = np.zeros((256, 256), np.int32)
    k = 0
    for r in range(16, 256, 32):
        for c in range(16, 256, 32):
            k += 1
            rr, cc = disk((r + rng.integers(-3, 4), c + rng.integers(-3, 4)), 12, shape=labels.shape)
            labels[rr, cc] = k
    t = make_targets(labels)
    out = instances_from_maps(t[0], t[1])
    assert out.max() == k
    assert np.array_equal(out > 0, labels > 0)


def test_empty_and_speck_maps():
    z = np.zeros((32, 32), np.float32)
    assert instances_from_maps(z, z).max() == 0
    specks = z.copy()
    specks[3, 3] = specks[20, 20:22] = 1.0
    assert instances_from_maps(specks, z, min_area=10).max() == 0
    assert np.array_equal(relabel(np.array([[0, 5, 5], [9, 0, 0]]), 2), np.array([[0, 1, 1], [0, 0, 0]]))


# ---------------------------------------------------------------- method + weights


@pytest.fixture()
def random_weights(tmp_path):
    from nucli.models.harunet import DEFAULT_CONFIG
    from nucli.models.weights_io import save_weights

    torch.manual_seed(0)
    net = build_network("cpu")
    path = tmp_path / "h.safetensors"
    save_weights(path, net.state_dict(), NAME, DEFAULT_CONFIG.to_dict())
    return path


def test_method_segments_any_tile_size(random_weights):
    from nucli.models.registry import build_method

    method = build_method(NAME, weights=random_weights)
    tiles = np.random.default_rng(0).integers(0, 255, (2, 100, 130, 3), dtype=np.uint8)
    maps = method.infer(tiles)
    assert maps.shape == (2, 2, 100, 130) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0
    results = method.segment(tiles)
    assert len(results) == 2
    for r in results:
        assert r.labels.shape == (100, 130) and r.labels.dtype == np.int32


def test_weights_of_another_method_or_shape_are_refused(tmp_path, random_weights):
    from nucli.models.registry import build_method
    from nucli.models.weights_io import save_weights

    other = tmp_path / "other.safetensors"
    save_weights(other, {"w": torch.zeros(3)}, "gensegnet", {"name": "gensegnet"})
    with pytest.raises(WeightsError, match="gensegnet"):
        build_method(NAME, weights=other)
    state = build_network("cpu").state_dict()
    key = next(k for k in state if k.endswith("conv.weight"))
    state[key] = torch.zeros(3, 3, 3, 3)
    wrong = tmp_path / "wrong.safetensors"
    save_weights(wrong, state, NAME, {"name": NAME, "params": {"preset": "cpu"}})
    with pytest.raises(WeightsError, match="shape"):
        build_method(NAME, weights=wrong)


def test_registered_with_the_expected_config():
    from nucli.models.registry import get_spec

    spec = get_spec(NAME)
    assert spec.needs_weights and spec.weights_file == "harunet_cpu.safetensors"
    assert spec.config.mpp == 0.35 and spec.config.overlap == 128
    assert spec.config.max_nucleus_diameter_px <= spec.config.overlap
    json.dumps(spec.config.to_dict())


def test_tiny_training_run_fits_one_image():
    torch.manual_seed(0)
    labels = _two_touching_discs((64, 96))
    target = torch.from_numpy(make_targets(labels))[None]
    image = torch.from_numpy((labels > 0).astype(np.float32))[None, None] * 0.8 + 0.1
    net = build_network("cpu")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = HARUNetLoss()
    first = None
    for _ in range(40):
        fused, sides = net(image)
        loss, _ = loss_fn(fused, sides, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_tuned_thresholds_travel_with_the_weights(tmp_path):
    from nucli.models.registry import build_method
    from nucli.training.data import Sample
    from nucli.training.harunet_train import export_weights, tune_postprocess

    torch.manual_seed(0)
    labels = _two_touching_discs((64, 96))
    x = (labels > 0).astype(np.float16)
    val = [Sample("a", x, x, (labels > 0).astype(np.uint8), labels)]
    net = build_network("cpu")
    grid = {"mask_threshold": (0.3, 0.5), "contour_threshold": (0.5,), "min_area": (7,)}
    params, metrics = tune_postprocess(net, val, grid)
    assert params["mask_threshold"] in (0.3, 0.5) and params["min_area"] == 7
    assert 0.0 <= metrics["aji"] <= 1.0
    path = export_weights(net, tmp_path / "w.safetensors", "cpu", params=params)
    method = build_method(NAME, weights=path)
    assert method.config.params["min_area"] == 7
    assert method.config.params["mask_threshold"] == params["mask_threshold"]
    # an explicit setting still wins over the stored one
    method = build_method(NAME, weights=path, params={**method.config.params, "min_area": 3})
    assert method.config.params["min_area"] == 3


def _write_dataset(root, n=2, size=96, seed=0):
    import tifffile
    from PIL import Image
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        lab = np.zeros((size, size), np.uint16)
        for k in range(6):
            rr, cc = disk(tuple(rng.integers(10, size - 10, 2)), int(rng.integers(5, 9)), shape=lab.shape)
            lab[rr, cc] = k + 1
        img = np.where(lab > 0, 200, 30).astype(np.uint8) + rng.integers(0, 20, lab.shape).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        tifffile.imwrite(root / "labels" / f"im{i}.tif", lab, compression="zlib")
    return root


def test_train_command_writes_loadable_weights(tmp_path):
    from typer.testing import CliRunner

    from nucli.cli import app
    from nucli.models.registry import build_method

    data = _write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    args = ["train", "--method", "harunet", "--data", str(data), "--val", str(data), "-o", str(out),
            "--epochs", "4", "--threads", "1", "--quiet", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    weights = out / "harunet_cpu.safetensors"
    assert weights.exists() and (out / "harunet_cpu.json").exists()
    summary = json.loads((out / "harunet_cpu.json").read_text())
    assert summary["steps"] == 2 and set(summary["postprocess"]) == {"mask_threshold", "contour_threshold", "min_area", "min_seed_area"}
    method = build_method(NAME, weights=weights)
    assert method.config.params["min_area"] == summary["postprocess"]["min_area"]
    # a second run into the same folder needs --resume (or --overwrite)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--resume" in res.output
    res = CliRunner().invoke(app, args + ["--resume"])
    assert res.exit_code == 0, res.output


def test_objects_wider_than_the_overlap_are_dropped_not_cut():
    from nucli.models.harunet import maps_to_labels

    maps = np.zeros((2, 200, 200), np.float32)
    yy, xx = np.mgrid[:200, :200]
    maps[0][(yy - 50) ** 2 + (xx - 50) ** 2 <= 10**2] = 1  # a nucleus
    maps[0][120:190, 20:190] = 1  # a 170 px wide clump
    kept = maps_to_labels(maps, {"min_area": 1}, max_diameter=64)
    assert kept.max() == 1 and kept[50, 50] == 1 and not kept[150, 100]
    assert maps_to_labels(maps, {"min_area": 1}).max() == 2  # no cap: both


def test_flip_tta_makes_the_maps_flip_equivariant():
    import torch

    from nucli.models.harunet import predict_maps

    torch.manual_seed(0)
    net = build_network("cpu").eval()
    img = np.random.default_rng(0).random((1, 64, 96)).astype(np.float32)
    flipped = np.ascontiguousarray(img[:, :, ::-1])
    plain, plain_f = predict_maps(net, img), predict_maps(net, flipped)
    assert not np.allclose(plain_f, plain[..., ::-1], atol=1e-4)  # the network alone is not
    tta, tta_f = predict_maps(net, img, tta=True), predict_maps(net, flipped, tta=True)
    assert np.allclose(tta_f, tta[..., ::-1], atol=1e-5)
    assert tta.shape == plain.shape and 0 <= tta.min() and tta.max() <= 1


@pytest.mark.parametrize("params", [{"preset": "huge"}, {"in_channels": "x"}, {"in_channels": 0}])
def test_a_weights_config_with_a_bad_preset_or_channels_is_a_weights_error(tmp_path, params):
    from nucli.models.registry import build_method
    from nucli.models.weights_io import save_weights

    bad = tmp_path / "bad.safetensors"
    save_weights(bad, build_network("cpu").state_dict(), NAME, {"name": NAME, "params": {"preset": "cpu", **params}})
    with pytest.raises(WeightsError, match="not a usable harunet weights file"):
        build_method(NAME, weights=bad)
