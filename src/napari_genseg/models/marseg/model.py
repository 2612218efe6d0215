"""MARSeg, the segmentation model (paper Fig. 1, Sec. 2.3; Ewha-AI/MARSeg ``models/marseg.py``).

Forward (no masking; every buffer token holds ``fake_latent``, as the official validation, which
passes no label)::

    x [B, 3, S, S] in [-1, 1]
      -> kl_encoder (LDM KL-16 encoder)        [B, 2z, S/16, S/16]   raw moments (mean, logvar)
      -> quant_conv (new 1x1, 2z -> z)          [B, z, h, w]          no posterior sample
      -> * latent_scale (0.2325)
      -> MAR encoder (mar_depth blocks)         outputs of blocks ``layer_indices`` -> encoder_norm
      -> MAR decoder (mar_depth blocks)         outputs of blocks ``layer_indices`` -> decoder_norm
      -> buffer stripped, (B, L, D) -> [B, D, g, g] per layer
      -> GPAF(enc_i, dec_i) per layer           [B, fuse_dim, g, g]
      -> FPN head                               [B, num_classes, g, g]
      -> bilinear x(S/g) (align_corners False)  [B, num_classes, S, S]

Key layout (official -> ours, see ``importer.py``): ``encoder.*`` -> ``kl_encoder.*``;
``quant_conv.*`` and ``mar.*`` unchanged; ``initial_projection_modules.i`` /
``spatial_attention_modules.i`` / ``channel_attention_modules.i`` / ``fusion_projection_modules.i``
-> ``gpaf.i.{proj_in, spatial, channel, proj_out}``; ``decoder.*`` -> ``head.*``.

Stage 2 (fine-tuning): the MAR encoder blocks are frozen, everything the forward runs trains
(:meth:`MarSeg.stage2_param_groups`, :meth:`MarSeg.freeze_for_stage2`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...nn.ldm import Encoder
from .config import MarSegConfig
from .head import GPAF, FPNHead
from .mar import MAR

__all__ = ["MarSeg", "build_marseg", "STAGE2_GROUPS"]

#: stage-2 parameter groups: name -> our key prefixes (everything the segmentation forward runs
#: except ``mar.encoder_blocks``, which stays frozen)
STAGE2_GROUPS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("kl_encoder.", "quant_conv."),
    "mar_embed": ("mar.z_proj.", "mar.z_proj_ln.", "mar.encoder_pos_embed_learned", "mar.fake_latent",
                  "mar.class_emb.", "mar.encoder_norm."),
    "mar_decoder": ("mar.decoder_embed.", "mar.decoder_pos_embed_learned", "mar.decoder_blocks.",
                    "mar.decoder_norm."),
    "gpaf": ("gpaf.",),
    "head": ("head.lateral_convs.", "head.fpn_convs.0.", "head.cls_seg."),
}
#: frozen in stage 2 (the paper: "the MAE encoder remains fixed")
STAGE2_FROZEN = ("mar.encoder_blocks.",)


class MarSeg(nn.Module):
    """KL-16 encoder + MAR + GPAF + FPN head (see the module docstring).

    Args:
        cfg: :class:`MarSegConfig`. With ``inference_only`` the diffusion head, its position
            embedding, the mask token, the class embedding and the official head's unused 3x3
            convs are not built.
    """

    def __init__(self, cfg: MarSegConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_size = cfg.img_size
        self.num_classes = cfg.num_classes
        self.layer_indices = tuple(cfg.layer_indices)
        # F.silu: LDM's swish in one fused pass (~5 % less KL-encoder time on the CPU, same values)
        self.kl_encoder = Encoder(cfg.vae_ch, cfg.vae_ch_mult, cfg.vae_num_res_blocks, 2 * cfg.vae_embed_dim,
                                  cfg.vae_norm_groups, cfg.in_chans, cfg.vae_attn_levels, act=F.silu)
        self.quant_conv = nn.Conv2d(2 * cfg.vae_embed_dim, cfg.vae_embed_dim, 1)
        self.mar = MAR(cfg)
        n = len(self.layer_indices)
        self.gpaf = nn.ModuleList(GPAF(cfg.mar_width, cfg.fuse_dim, cfg.ca_reduction, cfg.sa_kernel)
                                  for _ in range(n))
        self.head = FPNHead(cfg.fuse_dim, n, cfg.num_classes, num_fpn_convs=1 if cfg.inference_only else n)

    @property
    def config(self) -> MarSegConfig:
        """The configuration (also ``cfg``; MSA²Net's models name it ``config``)."""
        return self.cfg

    # ---- pieces ---------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        want = (self.cfg.in_chans, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"MARSeg expects input [B, {want[0]}, {want[1]}, {want[2]}] "
                             f"(position embeddings are not resized), got {tuple(x.shape)}")

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Image [B, C, S, S] -> scaled latents [B, z, S/16, S/16] (quant_conv on raw moments).

        Inference on the CPU (no autograd) feeds the KL encoder in channels-last layout, oneDNN's
        native one: the same values (within fp32 rounding, ~1e-7) and, measured at one thread,
        about 7 % less time per slice (the encoder holds 55 % of the FLOPs;
        ``benchmarks/marseg_speed.md``). Training (autograd on) keeps NCHW.
        """
        self._check(x)
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            x = x.contiguous(memory_format=torch.channels_last)
        return self.quant_conv(self.kl_encoder(x)) * self.cfg.latent_scale

    def forward_features(self, x: torch.Tensor, class_label: torch.Tensor | None = None,
                         generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """GPAF outputs, one [B, fuse_dim, g, g] per entry of ``layer_indices``.

        ``class_label`` (B,) puts the class embedding in the buffer (the official training; with
        MAR's label drop in training mode, draws from ``generator``); None uses ``fake_latent``.
        """
        lat = self.encode_latents(x)
        tokens = self.mar.patchify(lat)  # (B, L, C)
        b = tokens.shape[0]
        cond = self.mar.condition(b, class_label, generator)
        h, enc = self.mar.forward_encoder(tokens, cond, layers=self.layer_indices)
        _, dec = self.mar.forward_decoder(h, layers=self.layer_indices, output=False)
        g = self.mar.grid
        out = []
        for fuse, e, d in zip(self.gpaf, enc, dec):
            e = e.transpose(1, 2).reshape(b, -1, g, g)  # (B, L, D) -> [B, D, g, g]
            d = d.transpose(1, 2).reshape(b, -1, g, g)
            out.append(fuse(e, d))
        return out

    def forward(self, x: torch.Tensor, class_label: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Segmentation logits.

        Shapes:
            x: [B, in_chans, img_size, img_size], the official input is 3 identical channels
               in [-1, 1].
            returns: logits [B, num_classes, img_size, img_size] (before softmax).
        Raises ValueError for any other input shape.
        """
        logits = self.head(self.forward_features(x, class_label, generator))
        return F.interpolate(logits, size=(self.img_size, self.img_size), mode="bilinear",
                             align_corners=False)

    # ---- parameter bookkeeping ---------------------------------------------------------------
    def unused_at_inference(self) -> list[str]:
        """Key prefixes of parameters the segmentation forward never runs: the diffusion head, its
        position embedding, the mask token, the class embedding (no label at inference), the
        official head's 3x3 convs after the first, and MAE decoder blocks after
        max(``layer_indices``)."""
        out = ["mar.diffloss.", "mar.diffusion_pos_embed_learned", "mar.mask_token", "mar.class_emb."]
        out += [f"head.fpn_convs.{i}." for i in range(1, len(self.head.fpn_convs))]
        out += [f"mar.decoder_blocks.{i}." for i in range(max(self.layer_indices) + 1, self.cfg.mar_depth)]
        return out

    def num_inference_parameters(self) -> int:
        """Parameters the segmentation forward runs (the whole model minus
        :meth:`unused_at_inference`)."""
        skip = tuple(self.unused_at_inference())
        return sum(p.numel() for k, p in self.named_parameters() if not k.startswith(skip))

    def stage2_param_groups(self) -> list[dict]:
        """Stage-2 (fine-tuning) optimiser groups, ``[{"name", "params"}, ...]`` in the order of
        :data:`STAGE2_GROUPS`: tokenizer (KL-16 encoder + quant_conv), MAR embeddings and
        encoder_norm (trained by the official code although the blocks are frozen), MAR decoder,
        GPAF, head. Excluded: the frozen MAR encoder blocks and everything in
        :meth:`unused_at_inference` except the class embedding (which the official training
        feeds). Pure: does not change ``requires_grad`` (see :meth:`freeze_for_stage2`).
        """
        skip = tuple(p for p in self.unused_at_inference() if p != "mar.class_emb.")
        groups = []
        for name, prefixes in STAGE2_GROUPS.items():
            params = [p for k, p in self.named_parameters()
                      if k.startswith(prefixes) and not k.startswith(skip)]
            if params:
                groups.append({"name": name, "params": params})
        return groups

    def freeze_for_stage2(self) -> list[dict]:
        """Set ``requires_grad``: True for :meth:`stage2_param_groups`, False for everything else
        (MAR encoder blocks and the modules segmentation never runs). Returns the groups."""
        groups = self.stage2_param_groups()
        train = {id(p) for g in groups for p in g["params"]}
        for p in self.parameters():
            p.requires_grad_(id(p) in train)
        return groups


def build_marseg(cfg: MarSegConfig) -> nn.Module:
    """Registry builder: by ``cfg.module`` the segmentation model (:class:`MarSeg`), the stage-0
    :class:`~.autoencoder.KLAutoencoder` or the stage-1 :class:`~.pretrain.MarPretrainer`."""
    if cfg.module == "autoencoder":
        from .autoencoder import KLAutoencoder

        return KLAutoencoder.from_config(cfg)
    if cfg.module == "pretrain":
        from .pretrain import MarPretrainer

        return MarPretrainer(cfg)
    return MarSeg(cfg)
