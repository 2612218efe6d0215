"""AR-Seg next-scale segmentor (paper Sec. 2.2, Eq. 2-4): SVD adapter + AdaLN transformer.

Sequence layout (T_c conditioning tokens, K scales with pn_k² tokens each, L = sum pn_k² = 204):

    position      0 .. T_c-1        T_c            T_c+1 .. T_c+4    ...   T_c+140 .. T_c+203
    input         adapter tokens f  start (+class)  f_hat_1 @ 2x2    ...   f_hat_7 @ 8x8
    predicts      -                 scale 1 (1x1)  scale 2 (2x2)     ...   scale 8 (8x8)

Inputs of scale k >= 2 are ``word_embed`` (Linear code_dim -> width) of the cumulative f_hat after
scale k-1, area-downsampled to pn_k x pn_k (VAR teacher forcing). Every position has a learned
position embedding. Attention is block-causal by scale: a token sees every conditioning token, every
token of earlier scales and the tokens of its own scale; conditioning tokens see only each other.

Conditioning-token design (the paper's Eq. 2, made consistent and batched). The official config
expects 64 conditioning tokens (block size 268 = 64 + 204); its adapter produced 256. Here the
adapter always gives ``num_cond_tokens`` = g² tokens (64 = 8 x 8 for the paper config):

    f = LN( MLP(pool_g(E)) + W_svd pool_g(E_r) )

* ``pool_g``: area pooling of the embedding E [B, C_e, h, w] to g x g, one token per cell;
* ``E_r``: the rank-r truncated SVD of E seen as an (h*w) x C_e matrix, E_r = U_r S_r V_r^T =
  E V_r V_r^T, with r the smallest rank holding ``svd_energy`` (95 %) of sum(sigma), capped at
  ``svd_max_rank``. V_r and sigma come from one batched ``eigh`` of the C_e x C_e Gram matrix E^T E
  (no per-sample loop, no host sync: the rank is applied as a 0/1 mask on the eigenvectors). The
  projector V_r V_r^T is treated as a constant (no gradient through the eigen-decomposition, which is
  unstable at degenerate singular values); gradients reach E linearly. E_r is unique (no sign or
  basis ambiguity), unlike the singular vectors themselves.
* MLP: Linear(C_e, D) - GELU - Linear(D, D); W_svd: Linear(C_e, D) (the "linear SVD" branch).

The adapter runs once per image; sampling reuses its output for every scale and every sample.

Class conditioning (AdaLN, paper ref. [13]): a class embedding c (num_classes x D) drives one shared
SiLU-Linear(D, 6D) giving per-sample (gamma1, gamma2, scale1, scale2, shift1, shift2); each block adds
its own learned offsets (VAR's shared AdaLN) and uses LayerNorm without affine:
    x += (1 + gamma1) * Attn(LN(x) * (1 + scale1) + shift1)
    x += (1 + gamma2) * MLP(LN(x) * (1 + scale2) + shift2)
The modulation layers start at zero (a plain pre-LN transformer at init). The head is
LN -> AdaLN(scale, shift) -> Linear(D, V) without bias. The start token is a learned vector plus c.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...nn.attention import KVCache, SelfAttention
from .config import ArSegConfig

__all__ = ["SvdAdapter", "KVCache", "NextScaleSegmentor", "block_causal_mask", "scale_groups"]


def _eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched symmetric eigen-decomposition (on CPU for backends without ``eigh``)."""
    if gram.device.type in ("mps",):
        w, v = torch.linalg.eigh(gram.cpu())
        return w.to(gram.device), v.to(gram.device)
    return torch.linalg.eigh(gram)


class SvdAdapter(nn.Module):
    """Eq. 2: f = MLP(E) + SVD(E). Shapes: E [B, C_e, h, w] -> f (B, g², D)."""

    def __init__(self, in_dim: int, width: int, num_tokens: int, energy: float,
                 max_rank: int) -> None:
        super().__init__()
        self.grid = int(round(num_tokens**0.5))
        self.energy = float(energy)
        self.max_rank = int(max_rank)
        self.mlp = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width))
        self.svd_proj = nn.Linear(in_dim, width)
        self.norm = nn.LayerNorm(width)

    @torch.no_grad()
    def projector(self, e: torch.Tensor) -> torch.Tensor:
        """V_r V_r^T [B, C_e, C_e] of the truncated SVD of E (tokens x channels)."""
        x = e.detach().flatten(2)  # (B, C, hw)
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        gram = x @ x.transpose(1, 2)  # (B, C, C) = E^T E
        evals, evecs = _eigh(gram)  # ascending
        sigma = evals.flip(-1).clamp_min(0).sqrt()  # (B, C) descending singular values
        evecs = evecs.flip(-1)
        cum = sigma.cumsum(-1)
        before = cum - sigma  # energy of the components ranked above each one
        rank_ok = torch.arange(sigma.shape[-1], device=e.device) < self.max_rank
        keep = (before < self.energy * cum[..., -1:]) & rank_ok
        keep[..., 0] = True
        return (evecs * keep.unsqueeze(1).to(evecs.dtype)) @ evecs.transpose(1, 2)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        g = self.grid
        proj = self.projector(e).to(e.dtype)
        pooled = F.adaptive_avg_pool2d(e, g).flatten(2)  # (B, C, g²); pooling commutes with proj
        low = proj @ pooled  # (B, C, g²): pooled rows of E V_r V_r^T
        t = self.mlp(pooled.transpose(1, 2)) + self.svd_proj(low.transpose(1, 2))
        return self.norm(t)  # (B, g², D)


def _group_list(num_cond: int, patch_nums: tuple) -> list[int]:
    ids = [0] * num_cond
    for k, pn in enumerate(patch_nums, start=1):
        ids += [k] * (pn * pn)
    return ids


def scale_groups(num_cond: int, patch_nums: tuple) -> torch.Tensor:
    """Group id of every position: 0 for conditioning tokens, k for tokens of scale k (1-based)."""
    return torch.tensor(_group_list(num_cond, patch_nums), dtype=torch.long)


def block_causal_mask(num_cond: int, patch_nums: tuple) -> torch.Tensor:
    """Boolean (S, S) mask, True = query row may attend to key column."""
    g = scale_groups(num_cond, patch_nums)
    return g[None, :] <= g[:, None]


class AdaLNBlock(nn.Module):
    """Pre-LN transformer block modulated by the class (see the module docstring)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, attn_drop=dropout, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )
        #: this block's offsets added to the shared modulation: (1, 6, D)
        self.ada_gss = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        g1, g2, s1, s2, b1, b2 = (mod + self.ada_gss).unsqueeze(2).unbind(1)  # each (B, 1, D)
        x = x + self.attn(self.norm1(x) * (1 + s1) + b1, mask, cache, layer) * (1 + g1)
        return x + self.mlp(self.norm2(x) * (1 + s2) + b2) * (1 + g2)


class NextScaleSegmentor(nn.Module):
    """Adapter + block-causal AdaLN transformer over the conditioning and mask tokens."""

    def __init__(self, cfg: ArSegConfig) -> None:
        super().__init__()
        d = cfg.width
        self.width = d
        self.depth = cfg.depth
        self.vocab_size = cfg.vocab_size
        self.num_cond = cfg.num_cond_tokens
        self.patch_nums = tuple(cfg.patch_nums)
        self.num_tokens = cfg.num_tokens
        self.seq_len = self.num_cond + self.num_tokens

        self.adapter = SvdAdapter(cfg.embed_dim, d, cfg.num_cond_tokens, cfg.svd_energy,
                                  cfg.svd_max_rank)
        self.class_emb = nn.Embedding(cfg.num_classes, d)
        self.start_token = nn.Parameter(torch.zeros(1, 1, d))
        self.word_embed = nn.Linear(cfg.code_dim, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.seq_len, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(
            AdaLNBlock(d, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.head_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.head_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)

        groups = scale_groups(self.num_cond, self.patch_nums)
        self.register_buffer("groups", groups, persistent=False)
        self.register_buffer("attn_mask", groups[None, :] <= groups[:, None], persistent=False)
        self._groups_list = _group_list(self.num_cond, self.patch_nums)
        offsets = [0]
        for p in self.patch_nums:
            offsets.append(offsets[-1] + p * p)
        self.offsets = tuple(offsets)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.start_token, std=0.02)
        for lin in (self.ada_lin[-1], self.head_ada[-1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ---- pieces -------------------------------------------------------------------------------
    def condition(self, embedding: torch.Tensor, class_ids: torch.Tensor):
        """Adapter tokens (B, T_c, D) and class vector (B, D); compute once per image."""
        if class_ids.ndim != 1 or class_ids.shape[0] != embedding.shape[0]:
            raise ValueError("class_ids must be a (B,) LongTensor matching the embedding batch")
        return self.adapter(embedding), self.class_emb(class_ids.long())

    def _mask(self, start: int, end: int) -> torch.Tensor | None:
        """Rows start..end-1 against columns 0..end-1; None when nothing is masked."""
        g = self._groups_list
        if g[start] == g[end - 1]:  # one group: every earlier column is visible
            return None
        return self.attn_mask[start:end, :end]

    def prefix_tokens(self, cond: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """Embedded positions 0..T_c (conditioning tokens and the start token): (B, T_c+1, D)."""
        start = self.start_token.expand(cond.shape[0], -1, -1) + cls.unsqueeze(1)
        x = torch.cat([cond, start], dim=1)
        return x + self.pos_embed[:, : self.num_cond + 1]

    def scale_tokens(self, inputs: torch.Tensor, first: int) -> torch.Tensor:
        """word_embed(inputs) + positions, ``inputs`` starting at mask-token index ``first``."""
        s = self.num_cond + first
        return self.word_embed(inputs) + self.pos_embed[:, s : s + inputs.shape[1]]

    def run(self, x: torch.Tensor, cls: torch.Tensor, start: int,
            cache: KVCache | None = None) -> torch.Tensor:
        """Transformer over positions start .. start+T-1 (earlier ones come from ``cache``)."""
        end = start + x.shape[1]
        mask = self._mask(start, end)
        mod = self.ada_lin(cls).view(-1, 6, self.width)
        x = self.drop(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, mod, mask, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return x

    def logits(self, h: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, D) -> token logits (B, T, V)."""
        scale, shift = self.head_ada(cls).view(-1, 2, self.width).unsqueeze(2).unbind(1)
        return self.head(self.head_norm(h) * (1 + scale) + shift)

    # ---- training ------------------------------------------------------------------------------
    def forward(self, embedding: torch.Tensor, class_ids: torch.Tensor,
                teacher_inputs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of all scales.

        Shapes: embedding [B, C_e, h, w]; class_ids (B,); teacher_inputs (B, L - pn_1², code_dim)
        (``ResidualQuantizer.teacher_inputs``) -> logits (B, L, V).
        """
        cond, cls = self.condition(embedding, class_ids)
        return self.forward_tokens(cond, cls, teacher_inputs)

    def forward_tokens(self, cond: torch.Tensor, cls: torch.Tensor,
                       inputs: torch.Tensor | None) -> torch.Tensor:
        """Full (uncached) pass on a prefix of the sequence; logits of every mask position.

        ``inputs`` (B, n, code_dim) are the scale inputs of mask positions 1..n (None: only the
        start token). Returns logits (B, n + 1, V) for mask positions 0..n.
        """
        x = self.prefix_tokens(cond, cls)
        if inputs is not None and inputs.shape[1] > 0:
            x = torch.cat([x, self.scale_tokens(inputs, 1)], dim=1)
        h = self.run(x, cls, 0)
        return self.logits(h[:, self.num_cond:], cls)
