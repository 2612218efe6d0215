"""The KL-16 tokenizer as a whole autoencoder (stage 0): LDM's AutoencoderKL with its loss.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022):
CompVis/latent-diffusion ``ldm/models/autoencoder.py`` (AutoencoderKL),
``ldm/modules/distributions/distributions.py`` (DiagonalGaussianDistribution) and
``ldm/modules/losses/contperceptual.py`` (LPIPSWithDiscriminator); the KL-16 variant of
LTH14/mar ``models/vae.py`` (encoder attention at 16², decoder attention only in its mid block).

Shapes (KL-16 at 256²): image [B, 3, 256, 256] -> ``encoder`` -> [B, 2z, 16, 16] -> ``quant_conv``
(1x1, 2z -> 2z) -> posterior N(mean, exp(logvar)) with z = 16 channels; a latent [B, z, 16, 16] ->
``post_quant_conv`` (1x1) -> ``decoder`` -> [B, 3, 256, 256]. MAR consumes a posterior *sample*
times ``latent_scale`` (0.2325); MARSeg's segmentation model instead applies its own 1x1 conv to the
raw encoder moments (``model.py``) and does not use ``quant_conv`` here.

Loss (:meth:`KLAutoencoder.loss`), LDM's without the optional terms::

    rec  = |x - x_rec|                                       (per pixel, L1)
    nll  = sum(rec / exp(logvar) + logvar) / B                (``logvar``: one learned scalar, init 0)
    kl   = sum(KL(N(mean, var) || N(0, 1))) / B
    loss = nll + kl_weight * kl                               (kl_weight 1e-6 in LDM's KL configs)

LDM adds an LPIPS perceptual term (VGG16 features, weight 1) and, after ``disc_start`` steps, a
patch-GAN discriminator term. Neither is implemented here: LPIPS needs ImageNet-trained VGG
weights that cannot be downloaded in this project, and the discriminator matters for natural
images' texture more than for CT reconstructions; the L1 + KL objective is what remains.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...nn.ldm import Decoder, Encoder
from .config import MarSegConfig

__all__ = ["DiagonalGaussian", "KLAutoencoder"]


class DiagonalGaussian:
    """N(mean, exp(logvar)) from moments [B, 2z, h, w] (log-variance clamped to [-30, 20])."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, 1) drawn from ``generator`` (on the moments' device)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, 1) summed over (z, h, w): (B,)."""
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class KLAutoencoder(nn.Module):
    """LDM AutoencoderKL. Keys: ``encoder.*``, ``decoder.*``, ``quant_conv.*``,
    ``post_quant_conv.*`` (as in an LDM / MAR KL-16 checkpoint) and ``logvar`` (LDM's
    ``loss.logvar``).

    Args:
        ch, ch_mult, num_res_blocks, groups: LDM ``ddconfig`` (KL-16: 128, (1, 1, 2, 2, 4), 2, 32).
        embed_dim: latent channels z (16).
        in_channels: image channels (3).
        attn_levels / decoder_attn_levels: levels with attention in the encoder / decoder.
        latent_scale: factor between posterior samples and MAR's latents (0.2325).
    """

    def __init__(self, ch: int = 128, ch_mult: tuple = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 embed_dim: int = 16, groups: int = 32, in_channels: int = 3, attn_levels: tuple = (4,),
                 decoder_attn_levels: tuple = (), latent_scale: float = 0.2325) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.latent_scale = float(latent_scale)
        self.stride = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, 2 * embed_dim, groups, in_channels,
                               attn_levels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, embed_dim, groups, in_channels,
                               decoder_attn_levels)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.logvar = nn.Parameter(torch.zeros(()))

    @classmethod
    def from_config(cls, cfg: MarSegConfig) -> "KLAutoencoder":
        """The tokenizer described by a MARSeg configuration's ``vae_*`` fields."""
        return cls(cfg.vae_ch, cfg.vae_ch_mult, cfg.vae_num_res_blocks, cfg.vae_embed_dim,
                   cfg.vae_norm_groups, cfg.in_chans, cfg.vae_attn_levels, cfg.vae_decoder_attn_levels,
                   cfg.latent_scale)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise ValueError(f"expected images [B, C, H, W] with H, W multiples of {self.stride}, "
                             f"got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image [B, C, H, W] in [-1, 1] -> posterior over [B, z, H/16, W/16]."""
        self._check(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B, z, h, w] (unscaled) -> image [B, C, 16h, 16w]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction of a posterior sample (``sample``) or of its mean, and the posterior."""
        post = self.encode(x)
        z = post.sample(generator) if sample else post.mode()
        return self.decode(z), post

    @torch.no_grad()
    def latents(self, x: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> torch.Tensor:
        """MAR's input: a posterior sample (or the mean) times ``latent_scale``, [B, z, h, w]."""
        post = self.encode(x)
        return (post.sample(generator) if sample else post.mode()) * self.latent_scale

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None,
             kl_weight: float = 1e-6) -> dict:
        """Stage-0 objective (see the module docstring) on images x [B, C, H, W] in [-1, 1].

        Returns dict(loss, nll, kl (per image, summed over the latent), rec (mean L1 per pixel),
        logvar, reconstruction [B, C, H, W]).
        """
        rec_img, post = self.forward(x, generator)
        rec = (x.float() - rec_img.float()).abs()
        b = x.shape[0]
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / b
        kl = post.kl().float().sum() / b
        return {"loss": nll + kl_weight * kl, "nll": nll.detach(), "kl": kl.detach(),
                "rec": rec.mean().detach(), "logvar": self.logvar.detach(), "reconstruction": rec_img}
