"""AdaIN style refinement: pre-synthesised image (content) + real image (style) -> refined image.

``G(c, s) = decoder(AdaIN(E(c), E(s)))``: the encoder E gives features at
three scales; at every scale the content features are renormalised to the
channel-wise mean and standard deviation of the style features (adaptive
instance normalisation), and the decoder upsamples the deepest ones while
taking the shallower ones through skip connections -- those carry the
content's spatial detail -- and predicts a correction of the content image
itself (a zero-initialised residual head), so the refined image stays aligned
with the deformed label.

Losses (the paper's Eq. 2, with E in place of VGG-19)::

    L_content = || E_3(G(c, s)) - AdaIN(E_3(c), E_3(s)) ||^2
    L_style   = sum_l || mu(E_l(G)) - mu(E_l(s)) ||^2 + || sigma(E_l(G)) - sigma(E_l(s)) ||^2
    L_g       = L_content + gamma * L_style

No pretrained VGG is available offline, so E is **trained as part of this
module**: first as the encoder of an autoencoder on the real training images
(``reconstruct``: the decoder without AdaIN, L1 to the input), then frozen and
used both as the AdaIN encoder and as the feature extractor of the losses.
(The segmenter's encoder would be the other option, but it sees gray images
and changes while it trains, which would make the style target move.)
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def channel_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and standard deviation over space: (B, C, 1, 1) each."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    sigma = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    return mu, sigma


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Adaptive instance normalisation: content features with the style features' mean and std."""
    mc, sc = channel_stats(content, eps)
    ms, ss = channel_stats(style, eps)
    return (content - mc) / sc * ss + ms


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """RGB in [0, 1] -> features at full, 1/2 and 1/4 resolution (widths c, 2c, 4c)."""

    def __init__(self, channels: int = 16):
        super().__init__()
        c = channels
        self.l1 = nn.Sequential(_conv(3, c), _conv(c, c))
        self.l2 = nn.Sequential(nn.AvgPool2d(2), _conv(c, 2 * c), _conv(2 * c, 2 * c))
        self.l3 = nn.Sequential(nn.AvgPool2d(2), _conv(2 * c, 4 * c), _conv(4 * c, 4 * c))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.l1(x)
        f2 = self.l2(f1)
        return [f1, f2, self.l3(f2)]


class Decoder(nn.Module):
    """Features [f1, f2, f3] -> RGB in [0, 1]; f3 is upsampled, f2 and f1 come in through skips.

    Two output heads share the body: ``head`` decodes an image on its own (the
    autoencoder that trains the encoder), ``residual`` predicts a correction
    of the content image in logit space. The residual head starts at zero, so
    the refiner starts as the identity on its content image and every change
    it learns is a departure the losses asked for -- the image cannot drift
    away from the deformed label it must stay aligned with.
    """

    def __init__(self, channels: int = 16):
        super().__init__()
        c = channels
        self.up3 = nn.Sequential(_conv(4 * c, 2 * c), nn.Upsample(scale_factor=2, mode="nearest"))
        self.dec2 = nn.Sequential(_conv(4 * c, 2 * c), _conv(2 * c, c), nn.Upsample(scale_factor=2, mode="nearest"))
        self.dec1 = _conv(2 * c, c)
        self.head = nn.Conv2d(c, 3, 3, padding=1)
        self.residual = nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)

    def body(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = feats
        x = self.dec2(torch.cat([self.up3(f3), f2], dim=1))
        return self.dec1(torch.cat([x, f1], dim=1))

    def forward(self, feats: list[torch.Tensor], content: torch.Tensor | None = None) -> torch.Tensor:
        x = self.body(feats)
        if content is None:
            return torch.sigmoid(self.head(x))
        return torch.sigmoid(torch.logit(content.clamp(1e-3, 1 - 1e-3)) + self.residual(x))


class StyleRefiner(nn.Module):
    """Encoder + AdaIN at every scale + decoder with skips. H, W must be multiples of 4."""

    stride = 4

    def __init__(self, channels: int = 16):
        super().__init__()
        self.encoder = Encoder(channels)
        self.decoder = Decoder(channels)

    def stylise(self, content: torch.Tensor, style: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(refined image, AdaIN targets per scale)."""
        fc, fs = self.encoder(content), self.encoder(style)
        t = [adain(a, b) for a, b in zip(fc, fs)]
        return self.decoder(t, content), t

    def forward(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.stylise(content, style)[0]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Autoencoder pass (no AdaIN, no content shortcut) used to train the encoder."""
        return self.decoder(self.encoder(x))


def style_loss(feats_out: list[torch.Tensor], feats_style: list[torch.Tensor]) -> torch.Tensor:
    """Sum over scales of the squared differences of channel means and standard deviations."""
    total = feats_out[0].new_zeros(())
    for a, b in zip(feats_out, feats_style):
        ma, sa = channel_stats(a)
        mb, sb = channel_stats(b)
        total = total + F.mse_loss(ma, mb) + F.mse_loss(sa, sb)
    return total


def content_loss(feats_out: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """Squared distance between the deepest features of the output and the AdaIN target."""
    return F.mse_loss(feats_out[-1], target[-1])


def generation_loss(refiner: StyleRefiner, out: torch.Tensor, targets: list[torch.Tensor], style: torch.Tensor,
                    gamma: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """L_g = L_content + gamma * L_style, features from the (frozen) encoder of ``refiner``."""
    fo = refiner.encoder(out)
    with torch.no_grad():
        fs = refiner.encoder(style)
    lc = content_loss(fo, [t.detach() for t in targets])
    ls = style_loss(fo, fs)
    return lc + gamma * ls, {"content": lc.item(), "style": ls.item()}
