"""Transformer-based multi-scale discriminator (lightweight, after TransGAN's design).

The image is cut into patch sequences of size P, 2P, 4P and 8P, projected to
D/8, D/8, D/4 and D/2 dimensions with learnable positional encodings. After
each transformer block the tokens are average-pooled (2x2) and concatenated,
channel-wise, with the next scale's sequence. Blocks at resolutions above
16x16 tokens use grid (windowed) self-attention with window 8. A class token
is added before the last block; its output gives the real/fake logit.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):
    """Pre-norm transformer encoder block with optional grid (windowed) attention."""

    def __init__(self, dim: int, heads: int, window: int | None = None, mlp_ratio: float = 2.0):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def _attend(self, t: torch.Tensor) -> torch.Tensor:
        y = self.norm1(t)
        return self.attn(y, y, y, need_weights=False)[0]

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        if self.window and hw is not None:
            h, w = hw
            b, _, c = x.shape
            s = self.window
            g = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
            a = self._attend(g).view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, c)
            x = x + a
        else:
            x = x + self._attend(x)
        return x + self.mlp(self.norm2(x))


class Discriminator(nn.Module):
    """(B, in_ch, H, W) -> (B,) real/fake logits. H, W are padded to multiples of 8P inside."""

    def __init__(self, dim: int = 384, patch: int = 8, base_size: int = 256, heads: int = 4, window: int = 8,
                 in_ch: int = 1):
        super().__init__()
        self.patch = patch
        self.window = window
        dims = [dim // 8, dim // 8, dim // 4, dim // 2]
        self.proj = nn.ModuleList(
            nn.Conv2d(in_ch, d, kernel_size=patch * 2 ** i, stride=patch * 2 ** i) for i, d in enumerate(dims)
        )
        self.pos = nn.ParameterList(
            nn.Parameter(torch.zeros(1, d, max(base_size // (patch * 2 ** i), 1), max(base_size // (patch * 2 ** i), 1)))
            for i, d in enumerate(dims)
        )
        cum = [sum(dims[: i + 1]) for i in range(4)]
        self.blocks = nn.ModuleList(Block(cum[i], _heads(cum[i], heads), window) for i in range(3))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cum[3]))
        self.last = Block(cum[3], _heads(cum[3], heads), None)
        self.norm = nn.LayerNorm(cum[3])
        self.head = nn.Linear(cum[3], 1)
        for p in self.pos:
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _tokens(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        t = self.proj[i](x)
        h, w = t.shape[-2:]
        pos = self.pos[i]
        if pos.shape[-2:] != (h, w):
            pos = F.interpolate(pos, size=(h, w), mode="bilinear", align_corners=False)
        t = (t + pos).flatten(2).transpose(1, 2)
        return t, (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.patch * 8
        ph, pw = (-x.shape[-2]) % m, (-x.shape[-1]) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        feats = None
        for i in range(4):
            t, (h, w) = self._tokens(i, x)
            if feats is not None:
                b, _, c = feats.shape
                prev = feats.transpose(1, 2).reshape(b, c, h * 2, w * 2)
                prev = F.avg_pool2d(prev, 2).flatten(2).transpose(1, 2)
                t = torch.cat([prev, t], dim=2)
            if i < 3:
                grid = (h, w) if (h > 16 or w > 16) and h % self.window == 0 and w % self.window == 0 else None
                blk = self.blocks[i]
                feats = blk(t, grid) if grid else _global(blk, t)
            else:
                feats = t
        tok = torch.cat([self.cls_token.expand(feats.shape[0], -1, -1), feats], dim=1)
        tok = self.last(tok)
        return self.head(self.norm(tok[:, 0])).squeeze(1)


def _global(block: Block, t: torch.Tensor) -> torch.Tensor:
    return block(t, None)


def _heads(dim: int, want: int) -> int:
    h = want
    while dim % h:
        h -= 1
    return max(h, 1)
