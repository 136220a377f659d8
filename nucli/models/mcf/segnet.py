"""The segmentation network of MCF: the shared U-Net with two classes (background, nucleus)."""

from __future__ import annotations

from typing import Any

import numpy as np

WIDTHS = (16, 32, 64, 128)


def build_unet(widths: tuple[int, ...] | list[int] = WIDTHS) -> Any:
    from nucli.models.gensegnet.unet import UNet

    return UNet(tuple(int(w) for w in widths), in_ch=1, n_classes=2)


def predict_p1(net: Any, grey: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Nucleus probability (H, W) float32 for one grey image (nuclei bright, [0, 1])."""
    return predict_p1_batch(net, np.asarray(grey, np.float32)[None], device)[0]


def predict_p1_batch(net: Any, greys: np.ndarray, device: str = "cpu") -> np.ndarray:
    """(B, H, W) grey images -> (B, H, W) nucleus probabilities (reflect-padded to the network stride)."""
    import torch

    greys = np.asarray(greys, np.float32)
    b, h, w = greys.shape
    stride = int(getattr(net, "stride", 8))
    ph, pw = (-h) % stride, (-w) % stride
    if ph or pw:
        mode = "reflect" if min(h, w) > max(ph, pw) else "edge"
        greys = np.pad(greys, ((0, 0), (0, ph), (0, pw)), mode=mode)
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        logits = net(torch.from_numpy(np.ascontiguousarray(greys))[:, None].to(device))
        p1 = logits.softmax(dim=1)[:, 1, :h, :w].float().cpu().numpy()
    if was_training:
        net.train()
    return p1
