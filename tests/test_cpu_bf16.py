"""The bfloat16 inference copy: batch norms folded exactly, the original network untouched."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_folding_batch_norms_keeps_the_float32_outputs():
    from nucli.models.cpu_bf16 import fold_batch_norms
    from nucli.models.gensegnet.unet import UNet

    torch.manual_seed(0)
    net = UNet((8, 16, 32)).eval()
    for m in net.modules():  # non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        ref = net(x)
        import copy

        folded = fold_batch_norms(copy.deepcopy(net))
        got = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(ref, got, atol=1e-4)


def test_inference_copy_is_bfloat16_and_leaves_the_network_alone():
    from nucli.models.cpu_bf16 import inference_copy
    from nucli.models.gensegnet.unet import UNet

    net = UNet((8, 16)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = inference_copy(net)
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    x = torch.rand(1, 1, 32, 32)
    with torch.inference_mode():
        a, b = net(x), fast(x.to(torch.bfloat16)).float()
    assert (a - b).abs().max() < 0.1 * a.abs().max() + 0.05  # bfloat16 rounding, not another network


def test_gensegnet_uses_the_copy_for_its_unet_only_when_bf16_is_on():
    from nucli.models.registry import build_method

    m = build_method("gensegnet")
    tiles = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    m.bf16 = True
    m.infer(tiles)
    copies = m.__dict__.get("_bf16_nets", {})
    assert list(copies) == [id(m.unet)] and copies[id(m.unet)] is not m.unet
    m2 = build_method("gensegnet")
    m2.bf16 = False
    m2.infer(tiles)
    assert not m2.__dict__.get("_bf16_nets")
