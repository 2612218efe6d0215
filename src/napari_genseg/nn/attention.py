"""Multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention``.

:class:`SelfAttention` is the ViT / GPT attention (one ``qkv`` Linear, ``proj`` Linear; timm's
``Attention`` key names) with an optional boolean or additive mask and an optional
:class:`KVCache` for incremental decoding. SDPA picks the fused kernel of the device (flash /
memory-efficient on CUDA, the fused CPU kernel otherwise) and applies attention dropout only when
``dropout_p > 0``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["KVCache", "SelfAttention"]


class KVCache:
    """Keys/values of every layer for incremental decoding.

    Buffers are (B, heads, capacity, head_dim), filled left to right; ``length`` counts the
    positions already stored. ``repeat_interleave(n)`` turns B prefix rows into B*n sample rows.
    """

    def __init__(self, depth: int, capacity: int) -> None:
        self.capacity = capacity
        self.k: list[torch.Tensor | None] = [None] * depth
        self.v: list[torch.Tensor | None] = [None] * depth
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        b, h, t, d = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(b, h, self.capacity, d)
            self.v[layer] = v.new_empty(b, h, self.capacity, d)
        s, e = self.length, self.length + t
        if e > self.capacity:
            raise RuntimeError("KV cache capacity exceeded")
        self.k[layer][:, :, s:e] = k
        self.v[layer][:, :, s:e] = v
        return self.k[layer][:, :, :e], self.v[layer][:, :, :e]

    def advance(self, t: int) -> None:
        self.length += t

    def repeat_interleave(self, n: int) -> None:
        if n == 1:
            return
        self.k = [None if t is None else t.repeat_interleave(n, 0) for t in self.k]
        self.v = [None if t is None else t.repeat_interleave(n, 0) for t in self.v]


class SelfAttention(nn.Module):
    """softmax(q k^T / sqrt(d) + mask) v over ``heads`` heads of width d = dim / heads.

    Args:
        dim: token width D.
        heads: number of heads (D must be divisible by it).
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection (training only).
        qkv_bias: bias of the ``qkv`` Linear.

    Shapes: x (B, T, D) -> (B, T, D); ``mask`` broadcastable to (B, heads, T, T_total), True =
    may attend (or additive float); with ``cache`` the keys/values of earlier positions come from
    it and T_total = T_past + T.
    """

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.attn_drop = float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, T, d)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, heads, T_past + T, d)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
