"""U-Net for the 3-class map (background, nucleus body, coarse edge)."""

from __future__ import annotations

import torch
from torch import nn


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """(B, in_ch, H, W) -> (B, n_classes, H, W) logits; H, W multiples of :attr:`stride`."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512, 1024), in_ch: int = 1, n_classes: int = 3):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.stride = 2 ** (len(widths) - 1)
        self.enc = nn.ModuleList()
        cin = in_ch
        for w in widths:
            self.enc.append(_double_conv(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.up.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2))
            self.dec.append(_double_conv(widths[i - 1] * 2, widths[i - 1]))
        self.out = nn.Conv2d(widths[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.enc):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)
