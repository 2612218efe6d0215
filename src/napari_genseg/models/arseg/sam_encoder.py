"""SAM ViT image encoder (ViT-B as used by MedSAM), written from the SAM paper's description.

Kirillov et al., "Segment Anything" (2023); MedSAM (Ma et al., 2024) fine-tunes the ViT-B variant.
A plain ViT on 16x16 patches with an absolute position embedding, windowed attention (14x14 windows,
zero padding to a multiple of the window, no masking of the padding) in every block except a few
global-attention blocks, decomposed relative position bias (MViTv2: separate height and width
tables added to the attention logits) and a conv neck to 256 channels.

Shapes (ViT-B defaults): x [B, 3, 1024, 1024] -> tokens [B, 64, 64, 768] -> embedding
[B, 256, 64, 64]. The state-dict keys equal a SAM/MedSAM checkpoint's ``image_encoder.*`` keys with
the prefix removed (``patch_embed.proj``, ``pos_embed``, ``blocks.{i}.attn.{qkv,proj,rel_pos_h,
rel_pos_w}``, ``blocks.{i}.mlp.{lin1,lin2}``, ``blocks.{i}.norm{1,2}``, ``neck.{0..3}``).

The input is fed as is (MedSAM's encoder takes min-max scaled [0, 1] slices, no mean/std).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SamImageEncoder", "LayerNorm2d"]

#: query rows per attention call in global blocks (bounds the (heads, rows, 4096) bias tensor)
_QUERY_CHUNK = 1024


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of [B, C, H, W]."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).square().mean(1, keepdim=True)
        x = (x - mu) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _rel_table(q_len: int, k_len: int, table: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) pair along one axis: (q, k, d)."""
    need = 2 * max(q_len, k_len) - 1
    if table.shape[0] != need:  # resample the table linearly to the needed length
        table = F.interpolate(table.t().unsqueeze(0), size=need, mode="linear").squeeze(0).t()
    qs = max(k_len / q_len, 1.0)
    ks = max(q_len / k_len, 1.0)
    q_pos = torch.arange(q_len, device=table.device)[:, None] * qs
    k_pos = torch.arange(k_len, device=table.device)[None, :] * ks
    rel = (q_pos - k_pos + (k_len - 1) * ks).long()
    return table[rel]


class RelPosAttention(nn.Module):
    """Multi-head attention on a [B, H, W, C] grid with a decomposed relative-position bias."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n = h * w
        qkv = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, n, d)
        rh = _rel_table(h, h, self.rel_pos_h)  # (h, h, d)
        rw = _rel_table(w, w, self.rel_pos_w)  # (w, w, d)
        q_grid = q.reshape(b, self.heads, h, w, -1)
        # bias[b, m, (qy, qx), (ky, kx)] = q . Rh[qy, ky] + q . Rw[qx, kx]
        bias_h = torch.einsum("bmyxd,ykd->bmyxk", q_grid, rh)  # (B, heads, h, w, h)
        bias_w = torch.einsum("bmyxd,xkd->bmyxk", q_grid, rw)  # (B, heads, h, w, w)
        bias_h = bias_h.reshape(b, self.heads, n, h, 1)
        bias_w = bias_w.reshape(b, self.heads, n, 1, w)
        if n <= _QUERY_CHUNK:
            mask = (bias_h + bias_w).reshape(b, self.heads, n, n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            parts = []
            for s in range(0, n, _QUERY_CHUNK):
                e = min(s + _QUERY_CHUNK, n)
                mask = (bias_h[:, :, s:e] + bias_w[:, :, s:e]).reshape(b, self.heads, e - s, n)
                parts.append(F.scaled_dot_product_attention(q[:, :, s:e], k, v, attn_mask=mask))
            out = torch.cat(parts, dim=2)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class ViTBlock(nn.Module):
    """Pre-LN block; ``window > 0`` attends inside non-overlapping window x window tiles."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, window: int, grid: int) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_grid = (window, window) if window > 0 else (grid, grid)
        self.attn = RelPosAttention(dim, heads, attn_grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window > 0:
            b, h, w, c = y.shape
            s = self.window
            ph, pw = (-h) % s, (-w) % s
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            # (B, hp/s, s, wp/s, s, C) -> (B * windows, s, s, C)
            y = y.view(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
            y = self.attn(y)
            y = y.view(b, hp // s, wp // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
            y = y[:, :h, :w]
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # [B, H, W, C]


class SamImageEncoder(nn.Module):
    """SAM ViT image encoder.

    Shapes: x [B, in_chans, img_size, img_size] -> [B, out_chans, img_size/patch, same].
    """

    def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3,
                 width: int = 768, depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0,
                 out_chans: int = 256, window_size: int = 14,
                 global_attn_indexes: tuple = (2, 5, 8, 11)) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, width))
        self.blocks = nn.ModuleList(
            ViTBlock(width, heads, mlp_ratio, 0 if i in global_attn_indexes else window_size, grid)
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(width, out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
