"""The HARU-Net network: residual U-blocks, attention on skips, dual heads.

Layout (U²-Net-like, six stages):

* encoder ``En1..En6``: RSU7, RSU6, RSU5, RSU4, RSU4F, RSU4F (the height of
  the nested U shrinks as the network gets deeper), 2x max-pooling between
  stages;
* decoder ``De5..De1``: RSU4F, RSU4, RSU5, RSU6, RSU7, each fed by the
  upsampled deeper stage concatenated with the encoder skip of its level; the
  skip first passes an attention module: CBAM (channel then spatial
  attention) on levels 1-4, channel attention alone on the deepest level 5;
* two branches (foreground ``mask`` and ``contour``), each with six side
  outputs (3x3 conv on En6, De5, De4, De3, De2, De1) upsampled to the input
  size and fused by a Context Fusion block: weights per side map from global
  average- and max-pooling through a small MLP, then a 3x3 conv to one map.

Everything returns logits; apply a sigmoid for probabilities. The network
accepts any input size whose sides are a multiple of :data:`STRIDE`
(callers pad; see :func:`nucli.models.harunet.pad_to_stride`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 32  # 5 poolings between stages (RSU7 also pools 5 times inside)


@dataclass(frozen=True)
class Preset:
    """Stage widths. ``enc``/``dec`` rows are (rsu height or 0 for RSU4F, mid, out)."""

    enc: tuple[tuple[int, int, int], ...]
    dec: tuple[tuple[int, int, int], ...]  # decoder levels 5, 4, 3, 2, 1
    reduction: int = 8  # attention MLP reduction


def _lite(mid: int, out: int) -> Preset:
    heights = (7, 6, 5, 4, 0, 0)
    return Preset(
        enc=tuple((h, mid, out) for h in heights),
        dec=tuple((h, mid, out) for h in (0, 4, 5, 6, 7)),
        reduction=4,
    )


PRESETS: dict[str, Preset] = {
    # The paper's widths (those of the full U²-Net backbone), ~44 M parameters.
    "paper": Preset(
        enc=((7, 32, 64), (6, 32, 128), (5, 64, 256), (4, 128, 512), (0, 256, 512), (0, 256, 512)),
        dec=((0, 256, 512), (4, 128, 256), (5, 64, 128), (6, 32, 64), (7, 16, 64)),
        reduction=16,
    ),
    # Narrow and fast for CPU training and inference (same topology).
    "cpu": _lite(8, 16),
}


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _up_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """Residual U-block of height ``height`` (``height - 2`` poolings inside)."""

    def __init__(self, height: int, cin: int, mid: int, cout: int):
        super().__init__()
        if height < 3:
            raise ValueError("RSU height must be >= 3")
        self.conv_in = ConvBNReLU(cin, cout)
        self.enc = nn.ModuleList([ConvBNReLU(cout, mid)] + [ConvBNReLU(mid, mid) for _ in range(height - 2)])
        self.bottom = ConvBNReLU(mid, mid, dilation=2)
        self.dec = nn.ModuleList([ConvBNReLU(2 * mid, mid) for _ in range(height - 2)] + [ConvBNReLU(2 * mid, cout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xin = self.conv_in(x)
        skips = []
        h = xin
        for i, layer in enumerate(self.enc):
            if i > 0:
                h = F.max_pool2d(h, 2, ceil_mode=True)
            h = layer(h)
            skips.append(h)
        h = self.bottom(h)
        for layer, skip in zip(self.dec, reversed(skips)):
            h = layer(torch.cat([_up_to(h, skip), skip], dim=1))
        return h + xin


class RSU4F(nn.Module):
    """Residual U-block with dilated convolutions instead of pooling (deep, small maps)."""

    def __init__(self, cin: int, mid: int, cout: int):
        super().__init__()
        self.conv_in = ConvBNReLU(cin, cout)
        self.e1 = ConvBNReLU(cout, mid, 1)
        self.e2 = ConvBNReLU(mid, mid, 2)
        self.e3 = ConvBNReLU(mid, mid, 4)
        self.bottom = ConvBNReLU(mid, mid, 8)
        self.d3 = ConvBNReLU(2 * mid, mid, 4)
        self.d2 = ConvBNReLU(2 * mid, mid, 2)
        self.d1 = ConvBNReLU(2 * mid, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xin = self.conv_in(x)
        h1 = self.e1(xin)
        h2 = self.e2(h1)
        h3 = self.e3(h2)
        h4 = self.bottom(h3)
        d3 = self.d3(torch.cat([h4, h3], 1))
        d2 = self.d2(torch.cat([d3, h2], 1))
        return self.d1(torch.cat([d2, h1], 1)) + xin


def _block(height: int, cin: int, mid: int, cout: int) -> nn.Module:
    return RSU4F(cin, mid, cout) if height == 0 else RSU(height, cin, mid, cout)


class ChannelAttention(nn.Module):
    """Weights per channel from a shared MLP on global average- and max-pooling."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 2)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """Weights per pixel from channel-wise mean and max through a 7x7 conv."""

    def __init__(self, kernel: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Channel attention, then spatial attention (hybrid attention)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class ContextFusion(nn.Module):
    """Fuse the side maps of one branch: SE-style weights, then a 3x3 conv to one map."""

    def __init__(self, n_side: int = 6, hidden: int = 16):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(2 * n_side, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n_side))
        self.out = nn.Conv2d(n_side, 1, 3, padding=1)

    def forward(self, sides: torch.Tensor) -> torch.Tensor:
        vec = torch.cat([sides.mean((2, 3)), sides.amax((2, 3))], 1)
        weights = torch.sigmoid(self.fc(vec))[:, :, None, None]
        return self.out(sides * weights)


class HARUNet(nn.Module):
    """Dual-branch network: ``forward`` returns (fused (B,2,H,W), sides (B,6,2,H,W)) logits.

    Channel 0 is the foreground (nucleus) map, channel 1 the contour map. Side
    outputs are ordered deepest first: En6, De5, De4, De3, De2, De1.
    """

    BRANCHES = ("mask", "contour")

    def __init__(self, preset: Preset | str = "cpu", in_channels: int = 1):
        super().__init__()
        p = PRESETS[preset] if isinstance(preset, str) else preset
        self.in_channels = in_channels
        self.encoders = nn.ModuleList()
        cin = in_channels
        for h, mid, out in p.enc:
            self.encoders.append(_block(h, cin, mid, out))
            cin = out
        enc_out = [row[2] for row in p.enc]
        self.attn = nn.ModuleList()
        self.decoders = nn.ModuleList()
        deeper = enc_out[5]
        side_channels = [enc_out[5]]
        for k, (h, mid, out) in enumerate(p.dec):
            level = 4 - k  # index of the encoder skip: 4 (En5) .. 0 (En1)
            skip = enc_out[level]
            att = ChannelAttention(skip, p.reduction) if level == 4 else CBAM(skip, p.reduction)
            self.attn.append(att)
            self.decoders.append(_block(h, deeper + skip, mid, out))
            deeper = out
            side_channels.append(out)
        self.side = nn.ModuleDict(
            {b: nn.ModuleList([nn.Conv2d(c, 1, 3, padding=1) for c in side_channels]) for b in self.BRANCHES}
        )
        self.fuse = nn.ModuleDict({b: ContextFusion(len(side_channels)) for b in self.BRANCHES})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[-2:]
        skips = []
        h = x
        for i, enc in enumerate(self.encoders):
            if i > 0:
                h = F.max_pool2d(h, 2, ceil_mode=True)
            h = enc(h)
            skips.append(h)
        feats = [h]
        for k, (att, dec) in enumerate(zip(self.attn, self.decoders)):
            skip = skips[4 - k]
            h = dec(torch.cat([_up_to(h, skip), att(skip)], 1))
            feats.append(h)
        fused, sides = [], []
        for b in self.BRANCHES:
            maps = [
                F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
                if f.shape[-2:] != size else conv(f)
                for conv, f in zip(self.side[b], feats)
            ]
            stack = torch.cat(maps, 1)  # (B, 6, H, W)
            sides.append(stack)
            fused.append(self.fuse[b](stack))
        return torch.cat(fused, 1), torch.stack(sides, 2)
