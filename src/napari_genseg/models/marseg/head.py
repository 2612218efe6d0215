"""MARSeg's Generative Parallel Adaptive Feature Fusion (GPAF, paper Sec. 2.2, Eq. 3-6) and its
simplified FPN segmentation head (Sec. 2.3), as in Ewha-AI/MARSeg ``models/marseg.py``.

GPAF, per fused layer i (enc, dec: [B, D, h, w] MAE encoder / decoder features)::

    O_c  = ReLU(BN(Conv1x1(concat[enc, dec])))             2D -> D        (Eq. 3, "Proj")
    O_SA = O_c * sigmoid(Conv_kxk(concat[mean_c O_c, max_c O_c]))          (Eq. 4, no bias)
    O_CA = O_c * sigmoid(W2 ReLU(W1 avgpool O_c) + W2 ReLU(W1 maxpool O_c)) (Eq. 5 as coded: CBAM,
                                                                 W1: D -> D/r, W2: D/r -> D, no bias)
    O    = ReLU(BN(Conv1x1(concat[O_SA, O_CA])))           2D -> fuse_dim (Eq. 6)

(The paper's Eq. 5 writes W1(AvgPool + MaxPool); the official code, followed here, applies the MLP
to each pooling and adds the results.)

FPN head: lateral 1x1 convs summed (all maps share the token grid, so the official bilinear resize
between them is the identity and is left out), one 3x3 conv, a 1x1 classifier; no norm or
activation. The official head builds one 3x3 conv per input but runs only the first; this module
builds ``num_fpn_convs`` of them (1 for inference, all for the official state dict).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["SpatialAttention", "ChannelAttention", "GPAF", "FPNHead"]


class SpatialAttention(nn.Module):
    """sigmoid(Conv_kxk([mean over C, max over C])): [B, C, H, W] -> [B, 1, H, W]."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class ChannelAttention(nn.Module):
    """CBAM channel attention: [B, C, H, W] -> [B, C, 1, 1] weights in (0, 1)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        pooled = torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)])  # (2B, C, 1, 1)
        y = self.fc2(torch.relu(self.fc1(pooled)))
        return torch.sigmoid(y[:b] + y[b:])


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class GPAF(nn.Module):
    """One GPAF module (see the module docstring).

    Shapes: enc, dec [B, D, h, w] -> [B, fuse_dim, h, w].
    Keys: ``proj_in.{0,1}`` (official ``initial_projection_modules.i``), ``spatial.conv``
    (``spatial_attention_modules.i``), ``channel.{fc1,fc2}`` (``channel_attention_modules.i``),
    ``proj_out.{0,1}`` (``fusion_projection_modules.i``).
    """

    def __init__(self, dim: int, fuse_dim: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.proj_in = _conv_bn_relu(2 * dim, dim)
        self.spatial = SpatialAttention(kernel_size)
        self.channel = ChannelAttention(dim, reduction)
        self.proj_out = _conv_bn_relu(2 * dim, fuse_dim)

    def forward(self, enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        o = self.proj_in(torch.cat([enc, dec], dim=1))
        sa = o * self.spatial(o)
        ca = o * self.channel(o)
        return self.proj_out(torch.cat([sa, ca], dim=1))


class FPNHead(nn.Module):
    """Sum of lateral 1x1 convs -> 3x3 conv -> 1x1 classifier.

    Shapes: ``num_inputs`` maps [B, C, h, w] -> logits [B, num_classes, h, w].
    Keys (official ``decoder.*``): ``lateral_convs.{i}``, ``fpn_convs.{i}`` (only 0 runs),
    ``cls_seg``.
    """

    def __init__(self, channels: int, num_inputs: int, num_classes: int, num_fpn_convs: int = 1) -> None:
        super().__init__()
        if not 1 <= num_fpn_convs <= num_inputs:
            raise ValueError(f"num_fpn_convs must be in 1..{num_inputs}, got {num_fpn_convs}")
        self.lateral_convs = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(num_inputs))
        self.fpn_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1)
                                       for _ in range(num_fpn_convs))
        self.cls_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.lateral_convs):
            raise ValueError(f"expected {len(self.lateral_convs)} feature maps, got {len(feats)}")
        out = self.lateral_convs[0](feats[0])
        for conv, f in zip(self.lateral_convs[1:], feats[1:]):
            out = out + conv(f)
        return self.cls_seg(self.fpn_convs[0](out))
