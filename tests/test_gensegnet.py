"""GeNSeg-Net networks, method interface, weights loading and post-processing."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nucli.errors import WeightsError  # noqa: E402
from nucli.models.base import MethodConfig  # noqa: E402
from nucli.models.gensegnet.discriminator import Discriminator  # noqa: E402
from nucli.models.gensegnet.generator import Generator, pad_to  # noqa: E402
from nucli.models.gensegnet.postprocess import PostprocessParams, instances_from_probs  # noqa: E402
from nucli.models.gensegnet.preprocess import is_brightfield, normalize, to_gray  # noqa: E402
from nucli.models.gensegnet.unet import UNet  # noqa: E402

TINY = {"generator": {"channels": 4, "n_down": 2, "n_blocks": 2, "max_channels": 8, "input_skip": True},
        "unet": {"widths": [4, 8, 16]}}


@pytest.mark.parametrize("h,w", [(37, 53), (64, 64), (101, 30)])
def test_generator_and_unet_shapes_at_odd_sizes(h, w):
    gen = Generator(**TINY["generator"]).eval()
    unet = UNet(tuple(TINY["unet"]["widths"])).eval()
    x = torch.rand(2, 1, h, w)
    xp, (oh, ow) = pad_to(x, 4)
    assert (oh, ow) == (h, w) and xp.shape[-2] % 4 == 0 and xp.shape[-1] % 4 == 0
    with torch.inference_mode():
        y = gen(xp)[..., :h, :w]
        assert y.shape == (2, 1, h, w) and float(y.min()) >= 0 and float(y.max()) <= 1
        xp, _ = pad_to(x, unet.stride)
        logits = unet(xp)[..., :h, :w]
    assert logits.shape == (2, 3, h, w)


@pytest.mark.parametrize("h,w", [(67, 45), (128, 200), (256, 256)])
def test_discriminator_gives_one_logit_per_image(h, w):
    d = Discriminator(dim=32, base_size=128).eval()
    with torch.inference_mode():
        out = d(torch.rand(3, 1, h, w))
    assert out.shape == (3,)
    assert torch.isfinite(out).all()


def test_discriminator_scales_use_paper_projection_widths():
    d = Discriminator(dim=64)
    assert [p.out_channels for p in d.proj] == [8, 8, 16, 32]
    assert [p.kernel_size[0] for p in d.proj] == [8, 16, 32, 64]
    # grid attention with window 8 above 16x16 tokens: a 512 image has 64x64 tokens in stage 1
    assert d.blocks[0].window == 8


def test_brightfield_is_inverted_and_fluorescence_is_not():
    rng = np.random.default_rng(0)
    fluo = rng.integers(0, 20, (64, 64)).astype(np.uint8)
    fluo[20:30, 20:30] = 200
    bf = (255 - fluo).astype(np.uint8)
    assert not is_brightfield(to_gray(fluo)) and is_brightfield(to_gray(bf))
    a, b = normalize(fluo), normalize(np.repeat(bf[..., None], 3, axis=2))
    assert a[25, 25] > 0.9 and b[25, 25] > 0.9  # nuclei bright in both
    assert a[5, 5] < 0.2 and b[5, 5] < 0.2
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1


def test_flat_image_is_not_stretched_into_noise():
    img = np.full((32, 32), 10, np.uint8)
    img[0, 0] = 13
    assert normalize(img).max() < 0.25


def _probs_for(labels: np.ndarray, half: int = 2) -> np.ndarray:
    from nucli.training.targets import class_map

    cm = class_map(labels, half)
    return np.stack([(cm == k).astype(np.float32) for k in range(3)])


def test_postprocess_recovers_touching_nuclei_from_their_class_map():
    yy, xx = np.mgrid[:80, :80]
    lab = np.zeros((80, 80), np.int32)
    lab[(yy - 40) ** 2 + (xx - 28) ** 2 < 14 ** 2] = 1
    lab[((yy - 40) ** 2 + (xx - 54) ** 2 < 14 ** 2) & (lab == 0)] = 2
    lab[(yy - 10) ** 2 + (xx - 10) ** 2 < 5 ** 2] = 3
    pred = instances_from_probs(_probs_for(lab), PostprocessParams(min_area=5))
    assert pred.max() == 3
    for k in (1, 2, 3):
        ids, counts = np.unique(pred[lab == k], return_counts=True)
        best = ids[np.argmax(counts)]
        inter = ((pred == best) & (lab == k)).sum()
        union = ((pred == best) | (lab == k)).sum()
        assert best > 0 and inter / union > 0.85


def test_postprocess_of_empty_map_is_empty():
    p = np.zeros((3, 20, 20), np.float32)
    p[0] = 1
    assert instances_from_probs(p).max() == 0


def _tiny_weights(tmp_path, method="gensegnet", params=TINY):
    from nucli.models.weights_io import save_weights

    gen = Generator(**params["generator"])
    unet = UNet(tuple(params["unet"]["widths"]))
    tensors = {f"generator.{k}": v for k, v in gen.state_dict().items()}
    tensors.update({f"unet.{k}": v for k, v in unet.state_dict().items()})
    cfg = MethodConfig(name=method, params=dict(params)).to_dict()
    return save_weights(tmp_path / f"{method}.safetensors", tensors, method, cfg)


def test_method_from_weights_runs_on_any_tile_size(tmp_path):
    from nucli.models.registry import build_method

    path = _tiny_weights(tmp_path)
    method = build_method("gensegnet", weights=path)
    tiles = np.random.default_rng(1).integers(0, 255, (2, 45, 61, 3)).astype(np.uint8)
    raw = method.infer(tiles)
    assert raw.shape == (2, 3, 45, 61)
    assert np.allclose(raw.sum(axis=1), 1.0, atol=1e-4)
    results = method.postprocess(raw)
    assert len(results) == 2 and results[0].labels.shape == (45, 61) and results[0].labels.dtype == np.int32
    # enhance -> segment_enhanced gives the same as segment when the enhanced image is kept in float
    enhanced = method.enhance(tiles)
    assert enhanced.shape == (2, 45, 61)
    again = method.postprocess(method.classify(enhanced))
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(again, results))
    # the uint8 round trip used by the run store stays close
    u8 = method.segment_enhanced((enhanced * 255).round().astype(np.uint8))
    assert len(u8) == 2 and u8[0].labels.shape == (45, 61)


def test_weights_of_another_method_are_a_clear_error(tmp_path):
    from nucli.models.registry import build_method

    path = _tiny_weights(tmp_path, method="harunet")
    with pytest.raises(WeightsError, match="harunet"):
        build_method("gensegnet", weights=path)


def test_weights_of_another_shape_are_a_clear_error(tmp_path):
    from nucli.models.gensegnet.method import build
    from nucli.models.weights_io import load_weights, save_weights

    path = _tiny_weights(tmp_path)
    tensors, cfg = load_weights(path, "gensegnet")
    cfg["params"]["unet"]["widths"] = [4, 8, 32]  # the stored file says 16: shapes cannot match
    bad = save_weights(tmp_path / "bad.safetensors", tensors, "gensegnet", cfg)
    with pytest.raises(WeightsError, match="shape|does not fit"):
        build(MethodConfig(name="gensegnet", params={}), bad)


def test_not_a_weights_file_is_a_clear_error(tmp_path):
    from nucli.models.registry import build_method

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not safetensors at all")
    with pytest.raises(WeightsError):
        build_method("gensegnet", weights=junk)


def test_gensegnet_is_registered_as_default():
    from nucli.models.registry import DEFAULT_METHOD, get_spec

    spec = get_spec(None)
    assert DEFAULT_METHOD == "gensegnet" and spec.name == "gensegnet"
    assert spec.needs_weights and spec.weights_file == "gensegnet_cpu.safetensors"
    assert spec.config.overlap >= spec.config.max_nucleus_diameter_px


def test_enhance_store_writes_enhanced_tiles_and_resumes(tmp_path):
    from nucli.enhance_stage import ARRAY, STAGE, enhance_store, has_enhanced, segment_from_store
    from nucli.models.registry import build_method
    from nucli.pipeline import store_from_array, tile_extents

    method = build_method("gensegnet", weights=_tiny_weights(tmp_path))
    image = np.random.default_rng(2).integers(0, 255, (150, 200, 3)).astype(np.uint8)
    store = store_from_array(tmp_path / "run.zarr", image, tile_size=128, overlap=16)
    assert not has_enhanced(store, method)
    counts = enhance_store(store, method, batch_size=3)
    assert counts["tiles_enhanced"] == store.n_tiles
    assert store.done(STAGE).all() and has_enhanced(store, method)
    arr = store.read(ARRAY, store.n_tiles - 1)
    assert arr.dtype == np.uint8 and arr.shape == (128, 128)
    w, h = tile_extents(store)[store.n_tiles - 1]
    assert not arr[h:, :].any() and not arr[:, w:].any()  # nothing outside the image
    again = enhance_store(store, method)
    assert again["tiles_enhanced"] == 0  # resumed: all done
    res = segment_from_store(store, method, [0], tuple(tile_extents(store)[0]))
    assert res[0].labels.shape == (128, 128)


def test_cli_enhance_image_writes_png_and_refuses_to_overwrite(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from nucli.cli import app

    weights = _tiny_weights(tmp_path)
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3)).astype(np.uint8)).save(img)
    runner = CliRunner()
    r = runner.invoke(app, ["enhance", str(img), "--weights", str(weights), "-o", str(tmp_path / "e.png")])
    assert r.exit_code == 0, r.output
    out = np.asarray(Image.open(tmp_path / "e.png"))
    assert out.shape == (40, 50) and out.dtype == np.uint8
    r = runner.invoke(app, ["enhance", str(img), "--weights", str(weights), "-o", str(tmp_path / "e.png")])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = runner.invoke(app, ["enhance", str(tmp_path / "missing.png"), "--weights", str(weights)])
    assert r.exit_code == 2


def test_split_h_separates_a_merged_body_and_zero_keeps_it():
    yy, xx = np.mgrid[:80, :80]
    blob = ((yy - 40) ** 2 + (xx - 28) ** 2 < 14 ** 2) | ((yy - 40) ** 2 + (xx - 52) ** 2 < 14 ** 2)
    p = np.zeros((3, 80, 80), np.float32)
    p[0], p[1] = ~blob, blob
    assert instances_from_probs(p, PostprocessParams(split_h=0.0)).max() == 1
    split = instances_from_probs(p, PostprocessParams(split_h=1.0))
    assert split.max() == 2
    assert split[40, 20] != split[40, 60] and split[40, 20] > 0 and split[40, 60] > 0


def test_instances_larger_than_max_diameter_are_dropped():
    p = np.zeros((3, 120, 120), np.float32)
    p[0] = 1
    p[0, 10:100, 10:30], p[1, 10:100, 10:30] = 0, 1  # 90 px long
    p[0, 50:60, 60:70], p[1, 50:60, 60:70] = 0, 1  # 10 px
    p[0, 100:103, 40:110], p[1, 100:103, 40:110] = 0, 1  # 70 px long: radius 35 > 64 / 2 - 1
    assert instances_from_probs(p, PostprocessParams(max_diameter=0)).max() == 3
    kept = instances_from_probs(p, PostprocessParams(max_diameter=64))
    assert kept.max() == 1 and kept[55, 65] == 1 and kept[50, 20] == 0


def test_bf16_setting():
    from nucli.models.gensegnet.method import use_bf16

    assert use_bf16(False, torch.device("cpu")) is False
    assert use_bf16(True, torch.device("cpu")) is True
    assert isinstance(use_bf16("auto", torch.device("cpu")), bool)


def test_segment_store_uses_the_stored_enhancement(tmp_path):
    from nucli.enhance_stage import enhance_store, segment_from_store
    from nucli.models.registry import build_method
    from nucli.pipeline import segment_store, store_from_array, tile_extents, uses_stored_enhancement

    method = build_method("gensegnet", weights=_tiny_weights(tmp_path))
    image = np.random.default_rng(3).integers(0, 255, (150, 200, 3)).astype(np.uint8)
    store = store_from_array(tmp_path / "run.zarr", image, tile_size=128, overlap=16)
    assert not uses_stored_enhancement(store, method)
    enhance_store(store, method, batch_size=3)
    assert uses_stored_enhancement(store, method)

    def no_generator(tiles):  # the generator must not run again
        raise AssertionError("generator rerun")

    method.enhance = no_generator
    segment_store(store, method, progress=False)
    for i in range(store.n_tiles):
        expected = segment_from_store(store, method, [i], tuple(tile_extents(store)[i]))[0].labels
        w, h = tile_extents(store)[i]
        assert np.array_equal(store.read("labels", i)[:h, :w] > 0, expected[:h, :w] > 0)


def test_h_maxima_by_region_equals_skimage_inside_the_regions():
    from scipy import ndimage as ndi
    from skimage.morphology import h_maxima

    from nucli.postprocess import h_maxima_by_region

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:160, :160]
    for _ in range(25):
        img = np.zeros((160, 160), bool)
        for _ in range(int(rng.integers(1, 40))):
            r, c = rng.integers(0, 160, 2)
            a, b = rng.uniform(1, 14, 2)
            img |= ((yy - r) / a) ** 2 + ((xx - c) / b) ** 2 <= 1
        depth = ndi.gaussian_filter(ndi.distance_transform_edt(img), float(rng.choice([0.5, 1.0, 2.0])))
        h = float(rng.choice([0.5, 1.0, 3.0]))
        inside = depth > 0
        assert np.array_equal((h_maxima(depth, h) > 0) & inside, h_maxima_by_region(depth, h) > 0)
    # plateaus (an unsmoothed distance map, integer steps): the one-maximum shortcut and the loop agree
    # with skimage too, on regions of one flat top, of a flat ridge joining two tops, and of two tops
    for _ in range(15):
        img = np.zeros((120, 120), bool)
        for _ in range(int(rng.integers(1, 25))):
            r, c = rng.integers(0, 120, 2)
            a, b = rng.uniform(1, 12, 2)
            img |= ((yy[:120, :120] - r) / a) ** 2 + ((xx[:120, :120] - c) / b) ** 2 <= 1
        for depth in (ndi.distance_transform_edt(img), np.floor(ndi.distance_transform_edt(img)),
                      ndi.distance_transform_cdt(img).astype(np.float32)):
            for h in (0.5, 1.0, 2.0):
                inside = depth > 0
                assert np.array_equal((h_maxima(depth, h) > 0) & inside, h_maxima_by_region(depth, h) > 0)
    ridge = np.zeros((12, 30))
    ridge[3:9, 3:27] = 1.0
    ridge[5:7, 5:25] = 3.0  # one flat top
    twin = ridge.copy()
    twin[5:7, 12:18] = 2.0  # two tops of the same height with a saddle between them
    for img in (ridge, twin):
        for h in (0.5, 1.0, 1.5):
            assert np.array_equal((h_maxima(img, h) > 0) & (img > 0), h_maxima_by_region(img, h) > 0)
    # a lone region too shallow for h: no maximum, as with the whole image... unless it is the only one
    lone = np.zeros((20, 20))
    lone[5:8, 5:8] = 0.4
    assert np.array_equal(h_maxima_by_region(lone, 1.0) > 0, (h_maxima(lone, 1.0) > 0) & (lone > 0))


def test_enhance_runs_on_dask_and_in_shards_with_the_serial_result(tmp_path):
    from nucli.enhance_stage import ARRAY, STAGE, enhance_store
    from nucli.models.registry import build_method
    from nucli.parallel import MethodRecipe, make_runner
    from nucli.pipeline import store_from_array

    weights = _tiny_weights(tmp_path)
    method = build_method("gensegnet", weights=weights)
    image = np.random.default_rng(4).integers(0, 255, (150, 200, 3)).astype(np.uint8)

    def fresh(name):
        return store_from_array(tmp_path / name, image, tile_size=128, overlap=16)

    serial = fresh("serial.zarr")
    enhance_store(serial, method, batch_size=2)
    sharded = fresh("shards.zarr")
    first = enhance_store(sharded, method, batch_size=2, shard="0/2")
    assert 0 < first["tiles_enhanced"] < sharded.n_tiles and not sharded.done(STAGE).all()
    enhance_store(sharded, method, batch_size=2, shard="1/2")
    dasked = fresh("dask.zarr")
    with make_runner(workers=1) as runner:
        enhance_store(dasked, method, batch_size=2, runner=runner, recipe=MethodRecipe.create("gensegnet", weights))
    for store in (sharded, dasked):
        assert store.done(STAGE).all()
        for i in range(serial.n_tiles):
            assert np.array_equal(store.read(ARRAY, i), serial.read(ARRAY, i))


def test_flip_tta_averages_the_four_flips(tmp_path):
    from nucli.models.registry import build_method

    method = build_method("gensegnet", weights=_tiny_weights(tmp_path))
    tiles = np.random.default_rng(4).integers(0, 255, (1, 40, 56, 3)).astype(np.uint8)
    plain = method.infer(tiles)
    method.config.params["tta"] = True
    tta = method.infer(tiles)
    assert tta.shape == plain.shape == (1, 3, 40, 56) and np.allclose(tta.sum(axis=1), 1.0, atol=1e-4)
    assert not np.allclose(tta, plain, atol=1e-4)  # a random network is not flip-invariant
    flipped = method.infer(np.ascontiguousarray(tiles[:, ::-1, ::-1]))
    assert np.allclose(flipped[..., ::-1, ::-1], tta, atol=1e-4)  # the mean over the flip group is invariant
    manual = sum(np.flip(method.classify(method.enhance(np.ascontiguousarray(np.flip(tiles, d)))), tuple(a + 1 for a in d))
                 for d in ((), (1,), (2,), (1, 2))) / 4
    assert np.allclose(manual, tta, atol=1e-5)
