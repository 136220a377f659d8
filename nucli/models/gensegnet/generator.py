"""Lightweight enhancement generator: conv -> downsampling -> 9 Res-CBAM blocks -> gradual upsampling."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def _conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ChannelAttention(nn.Module):
    """CBAM channel attention: shared MLP over average- and max-pooled descriptors."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: 7x7 conv over channel-wise mean and max maps."""

    def __init__(self, kernel: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(desc))


class ResCBAM(nn.Module):
    """Residual block (conv-BN-ReLU-conv-BN) whose branch passes channel then spatial attention."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.ca = ChannelAttention(channels)
        self.sa = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.sa(self.ca(self.body(x))))


class Generator(nn.Module):
    """Gray image (B, in_channels, H, W) in [0, 1] -> enhanced image (B, 1, H, W) in [0, 1].

    ``in_channels`` 3: the gray, red and blue channels of
    :func:`nucli.models.gensegnet.preprocess.normalize_channels` (the gray one first; the input
    skip sees the gray channel only).

    ``channels`` is C (the first feature width); each of ``n_down`` stride-2
    convolutions doubles the width up to ``max_channels``. ``input_skip`` feeds
    the input image to the last full-resolution convolution as well (helps the
    narrow CPU preset keep contours sharp). H and W must be multiples of
    :attr:`stride`; :func:`pad_to` handles any size.
    """

    def __init__(self, channels: int = 64, n_down: int = 2, n_blocks: int = 9, max_channels: int = 256,
                 input_skip: bool = False, in_channels: int = 1):
        super().__init__()
        self.stride = 2 ** n_down
        self.input_skip = input_skip
        self.in_channels = int(in_channels)
        self.head = _conv_bn_relu(self.in_channels, channels, k=7)
        widths = [channels]
        down = []
        for _ in range(n_down):
            w = min(widths[-1] * 2, max_channels)
            down.append(_conv_bn_relu(widths[-1], w, stride=2))
            widths.append(w)
        self.down = nn.Sequential(*down)
        self.blocks = nn.Sequential(*[ResCBAM(widths[-1]) for _ in range(n_blocks)])
        up = []
        for i in range(n_down, 0, -1):  # gradual: one x2 step at a time
            up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    _conv_bn_relu(widths[i], widths[i - 1])))
        self.up = nn.Sequential(*up)
        self.tail = nn.Conv2d(channels + (1 if input_skip else 0), 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.up(self.blocks(self.down(self.head(x))))
        if self.input_skip:
            f = torch.cat([f, x[:, :1]], dim=1)
        return torch.sigmoid(self.tail(f))


class PassThrough(nn.Module):
    """No enhancement: returns its input (the segmentation-stage-alone ablation)."""

    stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def pad_to(x: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, H, W) at the bottom/right to multiples of ``multiple``; returns the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        if mode == "reflect" and (ph >= h or pw >= w):
            mode = "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)
