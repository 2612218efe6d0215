"""Segmentation losses.

``BoundaryDoULoss`` follows the MSA²Net spec (Sun et al. 2023, as in the official code): per class
``c`` on the softmax ``p`` and one-hot ``t`` of the whole batch,

* ``C`` = number of boundary pixels of ``t`` (foreground pixels whose 3x3 cross neighbourhood is not
  all foreground; zero padding outside the image), ``S = |t|``,
* ``alpha = min(2 (1 - (C + s) / (S + s)) - 1, 0.8)`` with ``s = 1e-5``,
* ``loss_c = (Σp² + Σt² - 2Σpt + s) / (Σp² + Σt² - (1 + alpha) Σpt + s)``,

and the loss is the mean of ``loss_c`` over all classes (background included).

``DiceCELoss``: cross-entropy + soft Dice (batch Dice over the foreground classes).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainOptionError

__all__ = ["one_hot", "boundary_count", "boundary_dou_loss", "BoundaryDoULoss", "soft_dice_loss", "DiceCELoss", "make_loss"]

SMOOTH = 1e-5


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) int -> (B, K, H, W) float."""
    return F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)


_CROSS = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])


def boundary_count(t: torch.Tensor) -> torch.Tensor:
    """Per-class boundary pixel count C of a one-hot (B, K, H, W) target -> (K,)."""
    b, k, h, w = t.shape
    kern = _CROSS.to(t.device, t.dtype)[None, None].expand(k, 1, 3, 3)
    y = F.conv2d(t, kern, padding=1, groups=k) * t
    return ((y > 0) & (y < 4.5)).sum(dim=(0, 2, 3)).to(torch.float32)


def boundary_dou_loss(logits: torch.Tensor, target: torch.Tensor, alpha_max: float = 0.8) -> torch.Tensor:
    """Boundary DoU loss of logits (B, K, H, W) against integer labels (B, H, W)."""
    k = logits.shape[1]
    p = torch.softmax(logits.float(), dim=1)
    t = one_hot(target, k)
    inter = (p * t).sum(dim=(0, 2, 3))
    y_sum = (t * t).sum(dim=(0, 2, 3))
    z_sum = (p * p).sum(dim=(0, 2, 3))
    with torch.no_grad():
        c = boundary_count(t)
        s = t.sum(dim=(0, 2, 3))
        alpha = 2.0 * (1.0 - (c + SMOOTH) / (s + SMOOTH)) - 1.0
        alpha = alpha.clamp(max=alpha_max)
    loss = (z_sum + y_sum - 2.0 * inter + SMOOTH) / (z_sum + y_sum - (1.0 + alpha) * inter + SMOOTH)
    return loss.mean()


class BoundaryDoULoss(nn.Module):
    def __init__(self, alpha_max: float = 0.8):
        super().__init__()
        self.alpha_max = alpha_max

    def forward(self, logits, target):
        return boundary_dou_loss(logits, target, self.alpha_max)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool = False) -> torch.Tensor:
    k = logits.shape[1]
    p = torch.softmax(logits.float(), dim=1)
    t = one_hot(target, k)
    if not include_background and k > 1:
        p, t = p[:, 1:], t[:, 1:]
    inter = (p * t).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + t.sum(dim=(0, 2, 3))
    dice = (2.0 * inter + SMOOTH) / (denom + SMOOTH)
    return 1.0 - dice.mean()


class DiceCELoss(nn.Module):
    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, class_weights=None):
        super().__init__()
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        self.register_buffer("class_weights", None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32))

    def forward(self, logits, target):
        ce = F.cross_entropy(logits.float(), target.long(), weight=self.class_weights)
        return self.ce_weight * ce + self.dice_weight * soft_dice_loss(logits, target)


def make_loss(name: str) -> nn.Module:
    name = name.lower()
    if name in ("bdou", "boundary_dou"):
        return BoundaryDoULoss()
    if name in ("dice_ce", "dicece"):
        return DiceCELoss()
    if name == "ce":
        return nn.CrossEntropyLoss()
    raise TrainOptionError(f"unknown loss {name!r} (bdou, dice_ce, ce)")
