"""Losses: soft Dice, CE + Dice for class maps, GAN losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over classes. ``logits`` (B, K, H, W), ``target`` (B, H, W) int64."""
    k = logits.shape[1]
    prob = logits.softmax(dim=1)
    onehot = F.one_hot(target, k).permute(0, 3, 1, 2).to(prob.dtype)
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, beta: float = 3.0
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * CE + beta * Dice (the GeNSeg-Net segmentation loss, alpha=1, beta=3)."""
    ce = F.cross_entropy(logits, target)
    dice = soft_dice_loss(logits, target)
    return alpha * ce + beta * dice, {"ce": ce.item(), "dice": dice.item()}


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Binary cross-entropy GAN loss on discriminator logits (non-saturating for G)."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)
