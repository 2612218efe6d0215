"""A small image encoder for CPU use and demo weights (not in the paper).

Produces the same kind of embedding as the SAM encoder, [B, C_e, h, w], at a fraction of the cost:
stride-2 conv stages (GroupNorm + GELU, one residual 3x3 conv each) down to stride
2 ** len(widths), a few global pre-LN transformer blocks on the h*w grid with a learned position
embedding, then a 1x1 conv + LayerNorm2d neck to C_e channels.

Shapes (arseg_light): x [B, 1, 128, 128] -> [B, 128, 8, 8].

:class:`EmbeddingSegHead` (not in the paper) decodes per-pixel class logits from the embedding alone,
so that an encoder can be pre-trained as a segmentation network on CT and then frozen, standing in
for the paper's segmentation-trained MedSAM encoder (``arseg_ct``, stage 0).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sam_encoder import LayerNorm2d

__all__ = ["LightImageEncoder", "EmbeddingSegHead"]


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class ConvStage(nn.Module):
    """conv3x3/2 -> GN -> GELU, then x + conv3x3(GELU(GN(x)))."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.down(x)))
        return x + self.conv(F.gelu(self.norm2(x)))


class EncoderBlock(nn.Module):
    """Pre-LN transformer block on (B, N, C) tokens (global attention, SDPA)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, d)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class LightImageEncoder(nn.Module):
    """Shapes: x [B, in_chans, S, S] -> [B, out_chans, S / 2**len(widths), same]."""

    def __init__(self, img_size: int, in_chans: int, widths: tuple, dim: int, depth: int,
                 heads: int, out_chans: int) -> None:
        super().__init__()
        stages = []
        cin = in_chans
        for w in widths:
            stages.append(ConvStage(cin, w))
            cin = w
        self.stages = nn.Sequential(*stages)
        grid = img_size // 2 ** len(widths)
        self.proj_in = nn.Conv2d(cin, dim, 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads) for _ in range(depth))
        self.neck = nn.Sequential(nn.Conv2d(dim, out_chans, 1, bias=False), LayerNorm2d(out_chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(self.stages(x))
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        if t.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"input grid {h}x{w} does not match the encoder's img_size")
        t = t + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        return self.neck(t.transpose(1, 2).reshape(b, c, h, w))


class EmbeddingSegHead(nn.Module):
    """Per-pixel class logits decoded from an image embedding only (no skip connections).

    conv3x3 -> GN -> GELU at the embedding grid, then ``log2(up)`` times (nearest x2, conv3x3, GN,
    GELU) with the width halved at each step (at least 16), then a 1x1 conv to ``num_classes``.
    Without skips every bit of the mask must pass through the embedding, which is what the
    segmentor's adapter sees: the head exists to train the encoder (stage 0), not to segment.

    Shapes: embedding [B, in_dim, h, w] -> logits [B, num_classes, h * up, w * up].
    Raises ``ValueError`` when ``up`` is not a power of 2.
    """

    def __init__(self, in_dim: int, dim: int, up: int, num_classes: int) -> None:
        super().__init__()
        if up < 1 or up & (up - 1):
            raise ValueError(f"up must be a power of 2, got {up}")
        self.stem = nn.Sequential(nn.Conv2d(in_dim, dim, 3, padding=1), nn.GroupNorm(_groups(dim), dim), nn.GELU())
        blocks, c = [], dim
        for _ in range(up.bit_length() - 1):
            co = max(16, c // 2)
            blocks.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                        nn.Conv2d(c, co, 3, padding=1), nn.GroupNorm(_groups(co), co), nn.GELU()))
            c = co
        self.up = nn.Sequential(*blocks)
        self.out = nn.Conv2d(c, num_classes, 1)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(self.stem(e)))
