"""LDM convolutional autoencoder blocks (Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models", CVPR 2022; CompVis/latent-diffusion ``ldm/modules/diffusionmodules/model.py``, the
VQGAN layout of taming-transformers; the copy in LTH14/mar ``models/vae.py`` is the same).

Shapes: :class:`Encoder` maps [B, C_in, S, S] -> [B, C_out, S / 2**(L-1), same] for ``ch_mult`` of
length L; :class:`Decoder` maps [B, z, s, s] -> [B, C_out, s * 2**(L-1), same].

State-dict keys follow LDM: ``conv_in``, ``down.{i}.block.{j}.{norm1,conv1,norm2,conv2,
nin_shortcut}``, ``down.{i}.attn.{j}.{norm,q,k,v,proj_out}`` (levels with attention only),
``down.{i}.downsample.conv``, ``mid.{block_1,attn_1,block_2}``, ``up.{i}.block.{j}``,
``up.{i}.attn.{j}``, ``up.{i}.upsample.conv``, ``norm_out``, ``conv_out``. ``up.{i}`` is resolution
level i (stored lowest level first, as LDM prepends).

Attention levels are given as level indices (``attn_levels``); LDM's ``attn_resolutions=(16,)`` at a
256² input is level 4 of ``ch_mult=(1, 1, 2, 2, 4)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "swish",
    "group_norm",
    "ResnetBlock",
    "AttnBlock",
    "Downsample",
    "Upsample",
    "MidBlock",
    "Encoder",
    "Decoder",
]


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), spelled as LDM's ``nonlinearity`` (the same value as ``F.silu``, but the
    rounding of the official code, which AR-Seg's near-tie fidelity check needs)."""
    return x * torch.sigmoid(x)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """LDM's ``Normalize``: GroupNorm(groups, eps 1e-6, affine)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv3x3 twice, plus a 1x1 ``nin_shortcut`` when the width changes.

    Shapes: [B, cin, H, W] -> [B, cout, H, W]. (LDM's time embedding and dropout are unused by
    its autoencoders and left out.) ``act``: the nonlinearity, :func:`swish` (LDM's rounding) or
    ``F.silu`` (the same function in one fused pass, faster on the CPU).
    """

    def __init__(self, cin: int, cout: int, groups: int, act=swish) -> None:
        super().__init__()
        self.act = act
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and self.act is F.silu:
            return self._forward_inplace(x)
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h

    def _forward_inplace(self, x: torch.Tensor) -> torch.Tensor:
        """Inference with ``F.silu``: the activation and the residual sum in place (the same
        values; 3 fewer full-size tensors per block, whose fresh pages cost the CPU ~10 % of the
        KL encoder's time at 256²)."""
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        if torch.result_type(h, x) != h.dtype:
            return x + h
        return h.add_(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1-conv projections, residual.

    ``exact=False`` (default) computes softmax(q k^T / sqrt(C)) v with
    ``scaled_dot_product_attention``; ``exact=True`` spells it out with two ``bmm`` in LDM's order
    (same value, LDM's fp32 rounding: AR-Seg's fidelity fixture has near-ties at 1e-6).

    Shapes: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, groups: int, exact: bool = False) -> None:
        super().__init__()
        self.exact = bool(exact)
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = self.q(y), self.k(y), self.v(y)
        if self.exact:
            q = q.reshape(b, c, h * w).transpose(1, 2)  # (B, hw, C)
            att = torch.softmax(torch.bmm(q, k.reshape(b, c, h * w)) * (int(c) ** -0.5), dim=2)
            y = torch.bmm(v.reshape(b, c, h * w), att.transpose(1, 2))  # (B, C, hw)
        else:
            q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (q, k, v))  # (B, 1, hw, C)
            y = F.scaled_dot_product_attention(q, k, v).transpose(2, 3)  # (B, 1, C, hw)
        return x + self.proj_out(y.reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding (0, 1, 0, 1) (right/bottom only): [B, C, H, W] ->
    [B, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """``block_1`` -> ``attn_1`` -> ``block_2`` at the lowest resolution."""

    def __init__(self, channels: int, groups: int, exact_attention: bool = False, act=swish) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, act)
        self.attn_1 = AttnBlock(channels, groups, exact_attention)
        self.block_2 = ResnetBlock(channels, channels, groups, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _check_levels(levels, n: int) -> tuple[int, ...]:
    levels = tuple(int(i) for i in levels)
    if any(not 0 <= i < n for i in levels):
        raise ValueError(f"attention levels {levels} outside 0..{n - 1}")
    return levels


class Encoder(nn.Module):
    """LDM encoder: conv_in, per level ``num_res_blocks`` ResnetBlocks (each followed by an
    AttnBlock on ``attn_levels``) and a Downsample except at the last level, the mid block, then
    norm-swish-conv_out.

    Shapes: [B, in_channels, S, S] -> [B, out_channels, S / 2**(len(ch_mult)-1), same]. A KL
    autoencoder's ``double_z`` encoder has ``out_channels = 2 * z_channels`` (mean and log-variance).
    ``act``: the nonlinearity of every block (see :class:`ResnetBlock`; default LDM's :func:`swish`).
    """

    def __init__(self, ch: int, ch_mult: tuple, num_res_blocks: int, out_channels: int, groups: int,
                 in_channels: int = 3, attn_levels: tuple = (), exact_attention: bool = False,
                 act=swish) -> None:
        super().__init__()
        self.act = act
        levels = _check_levels(attn_levels, len(ch_mult))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            cout = ch * mult
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(cin, cout, groups, act))
                cin = cout
                if level in levels:
                    stage.attn.append(AttnBlock(cin, groups, exact_attention))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(cin)
            self.down.append(stage)
        self.mid = MidBlock(cin, groups, exact_attention, act)
        self.norm_out = group_norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for j, blk in enumerate(stage.block):
                h = blk(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(self.act(self.norm_out(h)))


class Decoder(nn.Module):
    """LDM decoder: conv_in, mid block, then from the lowest level up ``num_res_blocks + 1``
    ResnetBlocks (each followed by an AttnBlock on ``attn_levels``) and an Upsample except at level
    0, then norm-swish-conv_out.

    Shapes: [B, z_channels, s, s] -> [B, out_channels, s * 2**(len(ch_mult)-1), same].
    """

    def __init__(self, ch: int, ch_mult: tuple, num_res_blocks: int, z_channels: int, groups: int,
                 out_channels: int = 3, attn_levels: tuple = (), exact_attention: bool = False) -> None:
        super().__init__()
        levels = _check_levels(attn_levels, len(ch_mult))
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = MidBlock(cin, groups, exact_attention)
        ups = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            cout = ch * ch_mult[level]
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(cin, cout, groups))
                cin = cout
                if level in levels:
                    stage.attn.append(AttnBlock(cin, groups, exact_attention))
            if level != 0:
                stage.upsample = Upsample(cin)
            ups.append(stage)
        # stored lowest level first so that ``up.{i}`` is resolution level i
        self.up = nn.ModuleList(reversed(ups))
        self.norm_out = group_norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for j, blk in enumerate(stage.block):
                h = blk(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
