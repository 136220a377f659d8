"""Training smoke runs: tiny data, a few steps, loadable weights, resume, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _write_dataset(root, n=4, size=64, seed=0):
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        lab = np.zeros((size, size), np.uint16)
        for k in range(1, 6):
            cy, cx, r = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(4, 8)
            lab[((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) & (lab == 0)] = k
        img = np.where(lab > 0, 180, 20).astype(np.uint8) + rng.integers(0, 20, (size, size)).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        tifffile.imwrite(root / "labels" / f"im{i}.tif", lab)
    return root


def test_three_step_training_writes_loadable_weights_and_resumes(tmp_path):
    from nucli.models.registry import build_method
    from nucli.training.gensegnet import PRESETS, generator_file, train_gensegnet

    data = _write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    gan_epochs = 3 * 2 / 4  # 3 GAN steps of batch 2 over 4 images
    summary = train_gensegnet(data, out, val_dir=data, preset="cpu", epochs=gan_epochs, crop=64, batch=2,
                              threads=1)
    assert summary["stages"]["gan"]["steps"] == 3
    assert "gan2" not in summary["stages"] and generator_file(out) == out / "gan.best.safetensors"
    weights = out / "gensegnet_cpu.safetensors"
    assert weights.exists() and (out / "gensegnet_cpu.json").exists() and (out / "gensegnet_cpu.md").exists()
    log = [json.loads(line) for line in (out / "gan.log.jsonl").read_text().splitlines()]
    assert any("l1" in r for r in log) and any("val_l1" in r for r in log)
    method = build_method("gensegnet", weights=weights)
    assert method.config.params["generator"] == PRESETS["cpu"]["generator"]
    res = method.segment(np.zeros((1, 64, 64, 3), np.uint8))
    assert res[0].labels.shape == (64, 64)
    # resuming a finished run trains nothing more and keeps the same generator
    before = (out / "gan.best.safetensors").read_bytes()
    again = train_gensegnet(data, out, val_dir=data, preset="cpu", epochs=gan_epochs, crop=64, batch=2,
                            resume=True, threads=1)
    assert again["stages"]["gan"]["steps"] == 3
    assert (out / "gan.best.safetensors").read_bytes() == before


def test_checkpoint_round_trip_restores_optimizer_state(tmp_path):
    from nucli.training.loop import load_checkpoint, save_checkpoint

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.rand(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", {"m": net}, {"o": opt}, {"step": 1})
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-3)
    meta = load_checkpoint(tmp_path / "c.safetensors", {"m": net2}, {"o": opt2})
    assert meta["step"] == 1
    assert torch.equal(net.weight, net2.weight)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and float(s1["step"]) == float(s2["step"])


def test_linear_decay_schedule():
    from nucli.training.loop import linear_decay

    assert linear_decay(0, 100, 0.5) == 1.0
    assert linear_decay(49, 100, 0.5) == 1.0
    assert linear_decay(75, 100, 0.5) == pytest.approx(0.5)
    assert linear_decay(100, 100, 0.5) == 0.0


def test_crop_sampler_shapes_and_augmentation_keep_pairs_aligned():
    from nucli.training.data import CropSampler, Sample
    from nucli.training.targets import class_map, ideal_image

    lab = np.zeros((50, 70), np.int32)
    lab[10:30, 20:45] = 1
    x = (lab > 0).astype(np.float16)
    s = Sample("a", x, ideal_image(lab).astype(np.float16), class_map(lab), lab)
    b = CropSampler([s], crop=64, batch=8, seed=3, augment=True).next()
    assert b["x"].shape == (8, 1, 64, 64) and b["ideal"].shape == (8, 1, 64, 64) and b["cls"].shape == (8, 64, 64)
    # nuclei in the ideal image and in the class map coincide after flips/rotations
    nucleus = b["ideal"][:, 0] > 0
    assert nucleus.any()
    assert (nucleus <= (b["cls"] > 0)).all()  # nuclei lie inside body + edge band
    assert ((b["cls"] == 1) <= nucleus).all()  # bodies lie inside nuclei


def test_cli_train_rejects_bad_inputs(tmp_path):
    from typer.testing import CliRunner

    from nucli.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "images/" in r.output
    data = _write_dataset(tmp_path / "data", n=1)
    out = tmp_path / "out2"
    out.mkdir()
    (out / "something").write_text("x")
    r = runner.invoke(app, ["train", "--data", str(data), "-o", str(out)])
    assert r.exit_code == 2 and "--resume" in r.output
    r = runner.invoke(app, ["train", "--data", str(data), "-o", str(tmp_path / "o3"), "--method", "watershed"])
    assert r.exit_code == 1 and "gensegnet" in r.output


def test_first_ctrl_c_finishes_the_step_and_checkpoints_it(tmp_path):
    """A Ctrl-C in the middle of a step: the step completes, is checkpointed, then KeyboardInterrupt."""
    import os
    import signal

    from nucli.training.loop import InterruptGuard, LoopConfig, load_checkpoint, train_supervised

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # also when run with SIGINT ignored
    try:
        _ctrl_c_during_training(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_during_training(tmp_path):
    import os
    import signal

    from nucli.training.loop import InterruptGuard, LoopConfig, load_checkpoint, train_supervised

    net = torch.nn.Linear(2, 1)
    x, y = torch.rand(8, 2), torch.rand(8, 1)

    def next_batch(i):
        if i == 6:  # the 7th step: Ctrl-C arrives while its batch is being made
            os.kill(os.getpid(), signal.SIGINT)
        return {"x": x, "y": y}

    loss = lambda m, b: (((m(b["x"]) - b["y"]) ** 2).mean(), {})  # noqa: E731
    cfg = LoopConfig(steps=50, lr=1e-2, ckpt_every=100, val_every=100)
    with pytest.raises(KeyboardInterrupt):
        train_supervised(net, next_batch, loss, None, cfg, tmp_path, "t")
    meta = load_checkpoint(tmp_path / "t.ckpt.safetensors", {"model": torch.nn.Linear(2, 1)}, {})
    assert meta["step"] == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    with InterruptGuard() as guard:  # outside a loop the guard only records the request
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested
    done = train_supervised(net, lambda i: {"x": x, "y": y}, loss, None, cfg, tmp_path, "t", resume=True)
    assert done["steps"] == 50


def test_cpu_long_preset_adds_a_second_gan_phase_used_by_the_later_stages(tmp_path):
    from nucli.training.gensegnet import generator_file, train_gensegnet

    data = _write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    summary = train_gensegnet(data, out, val_dir=data, preset="cpu-long", epochs=3 * 2 / 4, crop=64, batch=2,
                              threads=1)
    assert summary["stages"]["gan"]["steps"] == 3 and summary["stages"]["gan2"]["steps"] >= 1
    assert generator_file(out) == out / "gan2.best.safetensors"
    assert summary["config"]["params"]["preset"] == "cpu-long"
    assert (out / "gensegnet_cpu-long.safetensors").exists()
