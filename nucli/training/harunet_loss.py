"""HARU-Net loss: BCE + Dice on every side output and on the fused output, both branches.

    Loss = w_edge * tau_fused + w_mask * zeta_fused
           + sum_i w_side[i] * (tau_side_i + zeta_side_i)

where every term is binary cross-entropy plus the Dice loss
``1 - 2 sum(p g) / (sum(p^2) + sum(g^2))`` (squared denominators, as in the
paper). The paper leaves the weights unspecified beyond "weights for each loss
term"; like U²-Net, from which the side supervision comes, they default to 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per image (squared denominator), averaged over all leading dims."""
    p = torch.sigmoid(logits).flatten(-2)
    g = target.flatten(-2)
    num = 2.0 * (p * g).sum(-1) + eps
    den = (p * p).sum(-1) + (g * g).sum(-1) + eps
    return (1.0 - num / den).mean()


def bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE (mean over pixels) + Dice for logits and a same-shaped binary target."""
    return F.binary_cross_entropy_with_logits(logits, target) + dice_loss(logits, target)


@dataclass
class HARUNetLoss:
    """Callable ``(fused, sides, target) -> (loss, parts)``.

    ``fused``: (B, 2, H, W) logits [mask, contour]; ``sides``: (B, S, 2, H, W)
    logits; ``target``: (B, 2, H, W) in {0, 1}. ``parts`` holds detached floats
    for logging.
    """

    w_mask: float = 1.0
    w_edge: float = 1.0
    w_side: Sequence[float] = field(default_factory=lambda: (1.0,) * 6)

    def __call__(self, fused: torch.Tensor, sides: torch.Tensor, target: torch.Tensor):
        if fused.shape != target.shape:
            raise ValueError(f"fused {tuple(fused.shape)} and target {tuple(target.shape)} differ")
        if sides.shape[1] != len(self.w_side):
            raise ValueError(f"{sides.shape[1]} side outputs but {len(self.w_side)} side weights")
        target = target.to(fused.dtype)
        zeta = bce_dice(fused[:, 0], target[:, 0])
        tau = bce_dice(fused[:, 1], target[:, 1])
        total = self.w_mask * zeta + self.w_edge * tau
        side_sum = fused.new_zeros(())
        for i, w in enumerate(self.w_side):
            term = bce_dice(sides[:, i, 0], target[:, 0]) + bce_dice(sides[:, i, 1], target[:, 1])
            side_sum = side_sum + w * term
        total = total + side_sum
        parts = {"mask": float(zeta.detach()), "contour": float(tau.detach()), "sides": float(side_sum.detach())}
        return total, parts
