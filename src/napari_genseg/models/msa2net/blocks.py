"""MSA²Net building blocks: MASAG skip gate, LKA block, DAE-Former dual block, patch expanding.

Paper: "MSA²Net: Multi-scale Adaptive Attention-guided Network for Medical Image Segmentation"
(Kolahi et al., BMVC 2024). Official code: https://github.com/xmindflow/MSA-2Net (MIT),
``networks/masag.py`` and ``networks/msa2net.py``; the DAE-Former blocks follow
https://github.com/xmindflow/DAEFormer and the LKA block VAN (Guo et al. 2022).

Attribute names equal the official ones, so official state-dict keys load without renaming.
Shape notation: B batch, C channels, H x W spatial size, N = H*W tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "channel_layer_norm",
    "MASAG",
    "LKABlock",
    "DualTransformerBlock",
    "EfficientAttention",
    "ChannelAttention",
    "MixFFN",
    "PatchExpand",
    "FinalPatchExpandX4",
]


def channel_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the channels of an image: [B, C, H, W] -> [B, C, H, W]."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# MASAG: multi-scale adaptive spatial attention gate (official ``MultiScaleGatedAttn``)
# --------------------------------------------------------------------------------------------


class LocalContext(nn.Module):
    """Local branch of MASAG on the encoder feature X: [B, C, H, W] -> [B, C, H, W].

    ``dconv``: depth-wise 3x3 + BN + ReLU, then a *dense* 3x3 conv with dilation 2 + BN + ReLU
    (the paper calls it depth-wise-dilated; the official code is dense). ``proj``: 1x1 + BN.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dconv = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, padding=2, dilation=2),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
        )
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dconv(x))


class GlobalContext(nn.Module):
    """Global branch of MASAG on the decoder feature G: [B, C, H, W] -> [B, 1, H, W].

    Channel mean and channel max, concatenated, then 1x1 conv (2 -> 1) + BN.
    """

    def __init__(self):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(2, 1, 1), nn.BatchNorm2d(1))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat((g.mean(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)), dim=1)
        return self.proj(pooled)


class MultiscaleFusion(nn.Module):
    """U = BN(local(X) + global(G)): [B, C, H, W] x2 -> [B, C, H, W]."""

    def __init__(self, dim: int):
        super().__init__()
        self.local = LocalContext(dim)
        self.global_ = GlobalContext()
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.bn(self.local(x) + self.global_(g))


class MASAG(nn.Module):
    """Multi-scale adaptive spatial attention gate (official ``MultiScaleGatedAttn``).

    x: encoder skip feature X [B, C, H, W]; g: decoder feature G [B, C, H, W] -> [B, C, H, W]::

        U = MultiscaleFusion(X, G);  (A, B) = softmax_2(selection(U))
        X' = A*X + X;  G' = B*G + G;  U' = (sigmoid(X')*G') * (sigmoid(G')*X')
        out = bn_2(conv_block(sigmoid(bn(proj(U'))) * X))
    """

    def __init__(self, dim: int):
        super().__init__()
        self.multi = MultiscaleFusion(dim)
        self.selection = nn.Conv2d(dim, 2, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.bn_2 = nn.BatchNorm2d(dim)
        self.conv_block = nn.Sequential(nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.selection(self.multi(x, g)), dim=1)
        a, b = weights[:, 0:1], weights[:, 1:2]
        x_att = a * x + x
        g_att = b * g + g
        interaction = (torch.sigmoid(x_att) * g_att) * (torch.sigmoid(g_att) * x_att)
        gate = torch.sigmoid(self.bn(self.proj(interaction)))
        return self.bn_2(self.conv_block(gate * x))


# --------------------------------------------------------------------------------------------
# LKA block (VAN style), as in the official ``LKABlock``
# --------------------------------------------------------------------------------------------


class LargeKernelGate(nn.Module):
    """u * conv1(dw7x7_dil3(dw5x5(u))): [B, C, H, W] -> [B, C, H, W] (official ``AttentionModule``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class LKASpatialAttention(nn.Module):
    """proj_2(LKA(GELU(proj_1(x)))) + x: [B, C, H, W] -> [B, C, H, W] (its own shortcut)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj_1 = nn.Conv2d(dim, dim, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LargeKernelGate(dim)
        self.proj_2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))
        return y + x


class DepthwiseConv3x3(nn.Module):
    """Depth-wise 3x3 conv on an image [B, C, H, W] (wrapper kept for the ``dwconv.dwconv`` keys)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x)


class ConvMlp(nn.Module):
    """fc2(GELU(dw3x3(fc1(x)))) with 1x1 convs: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = DepthwiseConv3x3(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class LKABlock(nn.Module):
    """x + ls1*SA(LN(x)), then + ls2*MLP(LN(x)): [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, dim: int, mlp_ratio: int = 4, layer_scale_init: float = 1e-2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LKASpatialAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_1[:, None, None] * self.attn(channel_layer_norm(x, self.norm1))
        x = x + self.layer_scale_2[:, None, None] * self.mlp(channel_layer_norm(x, self.norm2))
        return x


# --------------------------------------------------------------------------------------------
# DAE-Former dual transformer block (paper variant of decoder_2)
# --------------------------------------------------------------------------------------------


class EfficientAttention(nn.Module):
    """Single-head efficient attention (Shen et al.): [B, C, H, W] -> [B, C, H, W].

    Keys are softmaxed over tokens, queries over channels; context = K V^T is [C, C].
    """

    def __init__(self, dim: int):
        super().__init__()
        self.keys = nn.Conv2d(dim, dim, 1)
        self.queries = nn.Conv2d(dim, dim, 1)
        self.values = nn.Conv2d(dim, dim, 1)
        self.reprojection = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        keys = torch.softmax(self.keys(x).reshape(b, c, h * w), dim=2)
        queries = torch.softmax(self.queries(x).reshape(b, c, h * w), dim=1)
        values = self.values(x).reshape(b, c, h * w)
        context = keys @ values.transpose(1, 2)  # [B, Ck, Cv]
        attended = (context.transpose(1, 2) @ queries).reshape(b, c, h, w)
        return self.reprojection(attended)


class ChannelAttention(nn.Module):
    """Transpose (channel) attention, L2-normalised q/k, learnable temperature: [B, N, C] -> [B, N, C]."""

    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"channel attention: dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)  # each [B, heads, C/heads, N]
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.temperature, dim=-1)
        out = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return self.proj(out)


class TokenDepthwiseConv3x3(nn.Module):
    """Depth-wise 3x3 conv on tokens [B, N, C] laid out row-major over H x W (DAE-Former ``DWConv``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        y = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w))
        return y.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc2(GELU(dw3x3(fc1(x)))) on tokens: [B, N, C] -> [B, N, C]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = TokenDepthwiseConv3x3(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class DualTransformerBlock(nn.Module):
    """DAE-Former block: spatial efficient attention, MixFFN, channel attention, MixFFN.

    x: tokens [B, N, C] (row-major over H x W) -> [B, N, C]; pre-norm residuals throughout.
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, channel_heads: int = 8):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.channel_attn = ChannelAttention(dim, channel_heads)
        self.norm4 = nn.LayerNorm(dim)
        self.mlp1 = MixFFN(dim, int(dim * mlp_ratio))
        self.mlp2 = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        y = self.norm1(x).transpose(1, 2).reshape(b, c, h, w)
        x = x + self.attn(y).flatten(2).transpose(1, 2)
        x = x + self.mlp1(self.norm2(x), h, w)
        x = x + self.channel_attn(self.norm3(x))
        x = x + self.mlp2(self.norm4(x), h, w)
        return x


# --------------------------------------------------------------------------------------------
# Patch expanding (Swin-Unet style up-sampling on tokens)
# --------------------------------------------------------------------------------------------


def _pixel_shuffle_tokens(x: torch.Tensor, h: int, w: int, scale: int) -> torch.Tensor:
    """[B, H*W, s*s*c] -> [B, (s*H)*(s*W), c], channels split as (p1 p2 c), row-major tokens."""
    b, n, cc = x.shape
    c = cc // (scale * scale)
    x = x.reshape(b, h, w, scale, scale, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * scale * w * scale, c)


class PatchExpand(nn.Module):
    """Linear C -> 2C (no bias), 2x2 pixel shuffle, LayerNorm(C/2): [B, H*W, C] -> [B, 4*H*W, C/2]."""

    def __init__(self, dim: int):
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.norm(_pixel_shuffle_tokens(self.expand(x), h, w, 2))


class FinalPatchExpandX4(nn.Module):
    """Linear C -> 16C (no bias), 4x4 pixel shuffle, LayerNorm(C): [B, H*W, C] -> [B, 16*H*W, C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.expand = nn.Linear(dim, 16 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.norm(_pixel_shuffle_tokens(self.expand(x), h, w, 4))
