"""AR-Seg multi-scale mask autoencoder (paper Sec. 2.1, Alg. 1 and 2; stage-1 loss Eq. 5).

* :class:`MaskEncoder` / :class:`MaskDecoder`: the LDM convolutional autoencoder of
  :mod:`napari_genseg.nn.ldm` on the binary mask (GroupNorm + swish residual blocks, one
  self-attention block in the middle, stride-2 convs down, nearest x2 + conv up). 128² mask -> [B, z, 8, 8] for ``ch_mult`` of length 5.
* :class:`ResidualQuantizer`: VAR-style residual multi-scale quantiser. For scale k with side
  ``pn``: area-downsample the residual to pn², nearest codebook entry (L2), bicubic-upsample the
  code vectors back to the latent size (not at the last scale), apply phi, add to f_hat and
  subtract from the residual. phi(h) = (1 - r) h + r conv3x3(h) with ``phi_shared`` convs shared by
  neighbouring scales.

State-dict keys: ``encoder.*``/``decoder.*`` follow the usual LDM layout (``down.{i}.block.{j}``,
``mid.block_1``, ``mid.attn_1``, ``up.{i}.upsample`` ...), ``quantizer.codebook.weight`` and
``quantizer.phi.{i}.*`` are ours (see ``importer.py`` for the official names).

Token layout: a token sequence is (B, L) with L = sum(pn²) (204), scale by scale, row-major inside
a scale (``idx_Bl``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...nn.ldm import Decoder, Encoder
from .config import ArSegConfig

__all__ = ["MaskVQ", "MaskEncoder", "MaskDecoder", "ResidualQuantizer", "dice_loss"]


class MaskEncoder(Encoder):
    """Mask [B, 1, S, S] -> feature [B, z, S / 2**(levels-1), same] (LDM encoder, no level
    attention, LDM's exact attention rounding)."""

    def __init__(self, ch: int, ch_mult: tuple, num_res_blocks: int, z_channels: int,
                 groups: int, in_channels: int = 1) -> None:
        super().__init__(ch, ch_mult, num_res_blocks, z_channels, groups, in_channels,
                         attn_levels=(), exact_attention=True)


class MaskDecoder(Decoder):
    """Feature [B, z, s, s] -> mask logits [B, 1, s * 2**(levels-1), same] (no clamp)."""

    def __init__(self, ch: int, ch_mult: tuple, num_res_blocks: int, z_channels: int,
                 groups: int, out_channels: int = 1) -> None:
        super().__init__(ch, ch_mult, num_res_blocks, z_channels, groups, out_channels,
                         attn_levels=(), exact_attention=True)


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) * h + r * conv3x3(h)."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__(dim, dim, 3, padding=1)
        self.ratio = float(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1.0 - self.ratio) + super().forward(h) * self.ratio


def phi_assignment(num_scales: int, num_phi: int) -> tuple[int, ...]:
    """Which shared phi each scale uses: nearest of ``num_phi`` ticks to k / (K - 1).

    The ticks sit at (j + 1/3) / ... for 4 convs (VAR's choice) and at bin centres otherwise; for
    8 scales and 4 convs this gives (0, 0, 1, 1, 2, 2, 3, 3).
    """
    if num_phi == 4:
        lo = 1.0 / (3 * num_phi)
    else:
        lo = 1.0 / (2 * num_phi)
    ticks = [lo + (1 - 2 * lo) * j / (num_phi - 1) for j in range(num_phi)] if num_phi > 1 else [0.5]
    out = []
    for k in range(num_scales):
        at = k / (num_scales - 1) if num_scales > 1 else 0.0
        out.append(min(range(num_phi), key=lambda j: (abs(ticks[j] - at), j)))
    return tuple(out)


class ResidualQuantizer(nn.Module):
    """VAR-style residual multi-scale quantiser on a [B, C, n, n] latent (n = patch_nums[-1])."""

    def __init__(self, vocab_size: int, dim: int, patch_nums: tuple, num_phi: int,
                 phi_ratio: float, beta: float) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.patch_nums = tuple(patch_nums)
        self.beta = beta
        self.codebook = nn.Embedding(vocab_size, dim)
        self.phi = nn.ModuleList(Phi(dim, phi_ratio) for _ in range(num_phi))
        self.phi_index = phi_assignment(len(self.patch_nums), num_phi)
        offsets = [0]
        for p in self.patch_nums:
            offsets.append(offsets[-1] + p * p)
        #: token offset of each scale in a (B, L) sequence; offsets[-1] == L
        self.offsets = tuple(offsets)
        bound = 1.0 / vocab_size
        nn.init.uniform_(self.codebook.weight, -bound, bound)

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    def _distances(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Squared L2 distance of each row to every code, (N, V), in the official expanded form
        ``|z|² + |e|² − 2 z·e`` (its fp32 rounding, not the exact distance, decides near-ties)."""
        e = self.codebook.weight.detach()
        d = z_NC.square().sum(1, keepdim=True) + e.square().sum(1)
        return torch.addmm(d, z_NC, e.t(), beta=1.0, alpha=-2.0)

    def _to_latent(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """phi_k(bicubic upsample of the code map h [B, C, pn, pn]) -> [B, C, n, n]."""
        if si != len(self.patch_nums) - 1:
            n = self.latent_size
            h = F.interpolate(h, size=(n, n), mode="bicubic")
        return self.phi[self.phi_index[si]](h)

    def scale_vectors(self, si: int, idx: torch.Tensor) -> torch.Tensor:
        """phi_k(upsample(lookup(idx))): a scale's contribution to f_hat, [B, C, n, n].

        ``idx`` is (B, pn²) or (B, pn, pn). The code map is the (B, pn², C) lookup seen as
        (B, C, pn, pn) without a copy (channels-last strides), as in the official decode path.
        """
        pn = self.patch_nums[si]
        b = idx.shape[0]
        h = self.codebook(idx.reshape(b, pn * pn)).transpose(1, 2).view(b, self.dim, pn, pn)
        return self._to_latent(si, h)

    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Alg. 1 on a latent f [B, C, n, n] -> (token ids per scale (B, pn²), f_hat per scale)."""
        ids, fhats, _ = self._quantize(f)
        return ids, fhats

    def quantize_near_ties(self, f: torch.Tensor, reference_ids: list[torch.Tensor], rtol: float = 1e-5
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """Alg. 1 with the reference's ids taken at near-ties (teacher forcing); for fidelity checks.

        Which of two almost equidistant codes is nearest depends on the fp32 reduction order of the
        CPU (SIMD width, thread count), so ids computed elsewhere (e.g. by the official code on
        another machine) can differ there and nowhere else. At each position where this machine's
        nearest id differs from ``reference_ids[k]`` but the reference code's distance is within
        ``rtol`` (relative) of the nearest distance, the reference id is used, so later scales see the
        reference's residual. Other positions keep this machine's id (a real mismatch stays visible).

        Args:
            f: latent [B, C, n, n].
            reference_ids: one (B, pn²) int tensor per scale (``fidelity/README.md``: the fixture's).
            rtol: relative tolerance of a near-tie, ``d_ref − d_min ≤ rtol · d_min``.

        Returns:
            (ids per scale, f_hat per scale, number of near-ties taken from the reference).
        """
        if len(reference_ids) != len(self.patch_nums):
            raise ValueError(f"expected {len(self.patch_nums)} reference scales, got {len(reference_ids)}")
        return self._quantize(f, reference_ids, rtol)

    def _quantize(self, f: torch.Tensor, reference_ids=None, rtol: float = 0.0):
        b, c, n, _ = f.shape
        if n != self.latent_size:
            raise ValueError(f"latent side {n} != patch_nums[-1] = {self.latent_size}")
        rest = f.detach()
        f_hat = torch.zeros_like(rest)
        ids, fhats = [], []
        ties = 0
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = rest if si == last else F.interpolate(rest, size=(pn, pn), mode="area")
            d = self._distances(z.permute(0, 2, 3, 1).reshape(-1, c))  # (B·pn², V)
            idx = d.argmin(1)
            if reference_ids is not None:
                ref = reference_ids[si].reshape(-1).to(device=idx.device, dtype=idx.dtype)
                d_min = d.gather(1, idx[:, None])[:, 0]
                d_ref = d.gather(1, ref[:, None])[:, 0]
                tie = (ref != idx) & (d_ref - d_min <= rtol * d_min.abs())
                ties += int(tie.sum())
                idx = torch.where(tie, ref, idx)
            idx = idx.view(b, pn * pn)
            # same numbers as scale_vectors, in the official encode path's contiguous layout:
            # the residual (hence later ids) is then bit-identical to the official quantiser's
            h = self.codebook(idx.view(b, pn, pn)).permute(0, 3, 1, 2)
            if si != last:
                h = F.interpolate(h, size=(n, n), mode="bicubic")
            h = self.phi[self.phi_index[si]](h.contiguous())
            f_hat = f_hat + h
            rest = rest - h
            ids.append(idx)
            fhats.append(f_hat)
        return ids, fhats, ties

    def split(self, idx_Bl: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) -> list of (B, pn²) per scale."""
        o = self.offsets
        if idx_Bl.shape[-1] != o[-1]:
            raise ValueError(f"expected {o[-1]} tokens per sequence, got {idx_Bl.shape[-1]}")
        return [idx_Bl[:, o[k]:o[k + 1]] for k in range(len(self.patch_nums))]

    def fhat_from_ids(self, idx_Bl: torch.Tensor, upto_scale: int | None = None) -> torch.Tensor:
        """Alg. 2 up to scale k (1-based; None = all): cumulative f_hat [B, C, n, n]."""
        k = len(self.patch_nums) if upto_scale is None else int(upto_scale)
        if not 1 <= k <= len(self.patch_nums):
            raise ValueError(f"upto_scale must be in 1..{len(self.patch_nums)}, got {upto_scale}")
        parts = self.split(idx_Bl)
        f_hat = None
        for si in range(k):
            h = self.scale_vectors(si, parts[si])
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def next_input(self, si: int, f_hat: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing input for scale si + 1: f_hat area-downsampled, as (B, pn², C)."""
        pn = self.patch_nums[si + 1]
        x = f_hat if pn == self.latent_size else F.interpolate(f_hat, size=(pn, pn), mode="area")
        return x.flatten(2).transpose(1, 2)

    def teacher_inputs(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        """Transformer inputs of scales 2..K from ground-truth ids: (B, L - pn_1², C)."""
        parts = self.split(idx_Bl)
        b = idx_Bl.shape[0]
        n = self.latent_size
        f_hat = self.codebook.weight.new_zeros(b, self.dim, n, n)
        out = []
        for si in range(len(self.patch_nums) - 1):
            f_hat = f_hat + self.scale_vectors(si, parts[si])
            out.append(self.next_input(si, f_hat))
        if not out:
            return f_hat.new_zeros(b, 0, self.dim)
        return torch.cat(out, dim=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-6) -> torch.Tensor:
    """1 - mean over the batch of the soft Dice of sigmoid(logits) with the target."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    dice = (2.0 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1.0 - dice.mean()


class MaskVQ(nn.Module):
    """The multi-scale mask autoencoder.

    Shapes (defaults): mask [B, 1, 128, 128] -> latent f [B, 32, 8, 8] -> ids (B, 204);
    ids -> f_hat [B, 32, 8, 8] -> logits [B, 1, 128, 128].
    """

    def __init__(self, cfg: ArSegConfig) -> None:
        super().__init__()
        self.mask_size = cfg.mask_size
        g = cfg.vq_norm_groups
        self.encoder = MaskEncoder(cfg.vq_ch, cfg.vq_ch_mult, cfg.vq_num_res_blocks,
                                   cfg.vq_z_channels, g)
        self.decoder = MaskDecoder(cfg.vq_ch, cfg.vq_ch_mult, cfg.vq_num_res_blocks,
                                   cfg.vq_z_channels, g)
        self.quant_conv = nn.Conv2d(cfg.vq_z_channels, cfg.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.vq_z_channels, 1)
        self.quantizer = ResidualQuantizer(cfg.vocab_size, cfg.code_dim, cfg.patch_nums,
                                           cfg.phi_shared, cfg.phi_ratio, cfg.vq_beta)

    @property
    def num_tokens(self) -> int:
        return self.quantizer.offsets[-1]

    def encode_latent(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [B, 1, S, S] (0/1 float) -> f [B, C, n, n]."""
        return self.quant_conv(self.encoder(mask))

    def decode_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat [B, C, n, n] -> logits [B, 1, S, S] (no clamp)."""
        # f_hat built from lookups may carry channels-last strides; decode a plain NCHW tensor
        f_hat = f_hat.contiguous(memory_format=torch.contiguous_format)
        return self.decoder(self.post_quant_conv(f_hat))

    @torch.no_grad()
    def encode_tokens(self, mask: torch.Tensor) -> torch.LongTensor:
        """mask [B, 1, S, S] -> token ids (B, L), scale by scale."""
        ids, _ = self.quantizer.quantize(self.encode_latent(mask.float()))
        return torch.cat(ids, dim=1)

    def decode_tokens(self, idx_Bl: torch.Tensor, upto_scale: int | None = None) -> torch.Tensor:
        """ids (B, L) -> logits [B, 1, S, S] of the partial sum f_hat up to ``upto_scale``."""
        return self.decode_fhat(self.quantizer.fhat_from_ids(idx_Bl, upto_scale))

    def forward(self, mask: torch.Tensor) -> dict:
        """Reconstruction with a straight-through f_hat and the VQ loss.

        Returns dict(logits [B,1,S,S], vq (scalar), ids list, fhats list).
        """
        f = self.encode_latent(mask)
        ids, fhats = self.quantizer.quantize(f)
        beta = self.quantizer.beta
        vq = f.new_zeros(())
        f_ng = f.detach()
        for f_hat in fhats:
            vq = vq + beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_ng)
        vq = vq / len(fhats)
        # straight-through: the decoder sees f_hat, the encoder gets the decoder's gradient as is;
        # the codebook and phi learn through the second VQ term only
        f_st = f + (fhats[-1] - f).detach()
        return {"logits": self.decode_fhat(f_st), "vq": vq, "ids": ids, "fhats": fhats}

    def loss(self, mask: torch.Tensor) -> dict:
        """Stage-1 loss (Eq. 5): Dice(sigma) + BCE(sigma) + VQ (beta 0.25, unit weights).

        mask: [B, 1, S, S] with values in {0, 1}. Returns dict(total, dice, bce, vq) of scalars.
        """
        mask = mask.float()
        out = self.forward(mask)
        logits = out["logits"]
        dice = dice_loss(logits, mask)
        bce = F.binary_cross_entropy_with_logits(logits, mask)
        total = dice + bce + out["vq"]
        return {"total": total, "dice": dice, "bce": bce, "vq": out["vq"]}

