"""MARSeg configuration: one flat, JSON-able dataclass describing the whole model.

MARSeg (Hwang, Rhee, Kim, Viriyasaranon, Choi, "MARSeg: Enhancing Medical Image Segmentation with
MAR and Adaptive Feature Fusion", MICCAI 2025; github.com/Ewha-AI/MARSeg, MIT) has four parts,
all sized by :class:`MarSegConfig`:

* ``vae_*``: the KL-16 tokenizer, an LDM AutoencoderKL (its encoder runs in the segmentation
  model; encoder + decoder are trained in stage 0, see ``autoencoder.py``);
* ``mar_*`` and the MAR fields: the masked autoregressive trunk of LTH14/mar (MAE encoder and
  decoder of ``mar_depth`` blocks each, ``buffer_size`` buffer tokens, learned position
  embeddings, ``fake_latent`` / class embedding);
* ``diffloss_*`` / ``diffusion_*``: the diffusion-loss head (SimpleMLPAdaLN) of MAR pre-training;
* ``layer_indices`` / ``fuse_dim`` / ``ca_reduction`` / ``sa_kernel``: GPAF fusion and FPN head.

Every field is JSON-able (tuples become lists in JSON and are turned back into tuples here), so
``MarSegConfig(**json.loads(json.dumps(asdict(cfg))))`` rebuilds ``cfg``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["MarSegConfig", "NOISE_SCHEDULES", "OFFICIAL_LATENT_SCALE", "MODULES"]

NOISE_SCHEDULES = ("cosine", "linear")

#: what ``build_marseg`` builds from a configuration (``MarSegConfig.module``): the segmentation
#: model (stage 2, inference), the KL autoencoder (stage 0) or the MAR pre-trainer (stage 1)
MODULES = ("segmentation", "autoencoder", "pretrain")

#: KL-16 latent scale of MAR / MARSeg (``z * 0.2325``; no mean shift)
OFFICIAL_LATENT_SCALE = 0.2325


@dataclass
class MarSegConfig:
    # ---- input / output --------------------------------------------------------------------------
    #: square input side; the model only works at this size (position embeddings are not resized)
    img_size: int = 256
    #: input channels (the official model takes 3 identical channels in [-1, 1])
    in_chans: int = 3
    #: segmentation classes (logit channels), background included
    num_classes: int = 3

    # ---- KL-16 tokenizer (LDM AutoencoderKL) ---------------------------------------------------
    vae_ch: int = 128
    vae_ch_mult: tuple = (1, 1, 2, 2, 4)
    vae_num_res_blocks: int = 2
    #: encoder levels with attention after each residual block (LDM ``attn_resolutions=(16,)`` at
    #: 256² = level 4); the mid block always has attention
    vae_attn_levels: tuple = (4,)
    #: decoder levels with attention (MAR's KL-16 decoder: none, mid block only)
    vae_decoder_attn_levels: tuple = ()
    #: latent channels z (the encoder emits 2 z: mean and log-variance, LDM ``double_z``)
    vae_embed_dim: int = 16
    vae_norm_groups: int = 32
    #: latents are multiplied by this before MAR (MAR's 0.2325 for KL-16)
    latent_scale: float = OFFICIAL_LATENT_SCALE

    # ---- MAR trunk -----------------------------------------------------------------------------
    #: latent pixels per token side (MAR: 1 -> one token per 16x16 image patch)
    patch_size: int = 1
    mar_width: int = 768
    #: blocks of the MAE encoder and of the MAE decoder (each)
    mar_depth: int = 12
    mar_heads: int = 12
    mlp_ratio: float = 4.0
    #: buffer tokens in front of the image tokens (class embedding / ``fake_latent``)
    buffer_size: int = 64
    #: rows of the class embedding (the official code sizes it with ``--class_num``, which is also
    #: its number of segmentation classes)
    class_num: int = 3
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    #: probability of replacing the class embedding by ``fake_latent`` in training
    label_drop_prob: float = 0.1
    #: MAR mask ratio: truncated normal on [mask_ratio_min, 1], mean 1, std 0.25
    mask_ratio_min: float = 0.7

    # ---- diffusion-loss head (MAR pre-training) --------------------------------------------------
    diffloss_depth: int = 6
    diffloss_width: int = 1024
    diffusion_steps: int = 1000
    #: respaced steps for sampling (MAR ``num_sampling_steps``)
    num_sampling_steps: int = 100
    noise_schedule: str = "cosine"
    #: each latent is repeated this many times with independent (t, noise) in the loss
    diffusion_batch_mul: int = 4

    # ---- segmentation (GPAF + FPN head) ----------------------------------------------------------
    #: 0-based MAE encoder/decoder blocks fused by GPAF (the paper's "9-12")
    layer_indices: tuple = (8, 9, 10, 11)
    fuse_dim: int = 256
    #: GPAF channel attention: width -> width / ca_reduction -> width
    ca_reduction: int = 16
    #: GPAF spatial attention kernel
    sa_kernel: int = 7

    # ---- build -----------------------------------------------------------------------------------
    #: True: build only what the segmentation forward runs (no diffusion head, diffusion position
    #: embedding, mask token, class embedding, nor the official head's 3 unused 3x3 convs).
    #: False: the official module set (MAR pre-training and the official parameter count).
    inference_only: bool = False
    #: the module built from this configuration (:data:`MODULES`): "segmentation" (:class:`MarSeg`,
    #: stage 2 and inference), "autoencoder" (:class:`KLAutoencoder`, stage 0) or "pretrain"
    #: (:class:`MarPretrainer`, stage 1); a checkpoint of each stage records its own
    module: str = "segmentation"

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        for name in ("vae_ch_mult", "vae_attn_levels", "vae_decoder_attn_levels", "layer_indices"):
            setattr(self, name, tuple(int(i) for i in getattr(self, name)))
        for name in ("latent_scale", "mlp_ratio", "attn_dropout", "proj_dropout", "label_drop_prob",
                     "mask_ratio_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"MarSegConfig: {name} must be a number, got {v!r}")
            setattr(self, name, float(v))
        self._validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def vae_stride(self) -> int:
        """Image pixels per latent pixel (16 for KL-16)."""
        return 2 ** (len(self.vae_ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the latent map (16 at 256²)."""
        return self.img_size // self.vae_stride

    @property
    def grid_size(self) -> int:
        """Side of the token grid (latent side / patch size)."""
        return self.latent_size // self.patch_size

    @property
    def seq_len(self) -> int:
        """Image tokens (256 at 256²); the MAR sequence has ``seq_len + buffer_size``."""
        return self.grid_size**2

    @property
    def token_dim(self) -> int:
        """Width of one latent token: vae_embed_dim * patch_size²."""
        return self.vae_embed_dim * self.patch_size**2

    # ---- validation ------------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"MarSegConfig: {msg}")

        for name in ("img_size", "in_chans", "num_classes", "vae_ch", "vae_num_res_blocks",
                     "vae_embed_dim", "vae_norm_groups", "patch_size", "mar_width", "mar_depth",
                     "mar_heads", "buffer_size", "class_num", "diffloss_depth", "diffloss_width",
                     "diffusion_steps", "num_sampling_steps", "diffusion_batch_mul", "fuse_dim",
                     "ca_reduction", "sa_kernel"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name} must be a positive int, got {v!r}")
        need(isinstance(self.inference_only, bool), "inference_only must be a bool")
        need(self.module in MODULES, f"module must be one of {MODULES}, got {self.module!r}")
        need(not (self.inference_only and self.module == "pretrain"),
             "MAR pre-training (module 'pretrain') needs the diffusion head: inference_only must be False")
        need(len(self.vae_ch_mult) >= 1 and all(m >= 1 for m in self.vae_ch_mult),
             f"vae_ch_mult must be positive ints, got {self.vae_ch_mult}")
        n_levels = len(self.vae_ch_mult)
        for name in ("vae_attn_levels", "vae_decoder_attn_levels"):
            lv = getattr(self, name)
            need(all(0 <= i < n_levels for i in lv) and len(set(lv)) == len(lv),
                 f"{name} must be distinct levels in 0..{n_levels - 1}, got {lv}")
        for c in {self.vae_ch * m for m in self.vae_ch_mult}:
            need(c % self.vae_norm_groups == 0,
                 f"tokenizer width {c} is not divisible by vae_norm_groups {self.vae_norm_groups}")
        need(self.img_size % self.vae_stride == 0,
             f"img_size {self.img_size} must be a multiple of the tokenizer stride {self.vae_stride}")
        need(self.latent_size % self.patch_size == 0,
             f"latent side {self.latent_size} must be a multiple of patch_size {self.patch_size}")
        need(self.mar_width % self.mar_heads == 0,
             f"mar_width {self.mar_width} must be divisible by mar_heads {self.mar_heads}")
        need(self.mlp_ratio > 0, "mlp_ratio must be positive")
        need(self.latent_scale > 0 and math.isfinite(self.latent_scale), "latent_scale must be > 0")
        for name in ("attn_dropout", "proj_dropout", "label_drop_prob"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1)")
        need(0.0 <= self.mask_ratio_min < 1.0, "mask_ratio_min must be in [0, 1)")
        need(self.noise_schedule in NOISE_SCHEDULES,
             f"noise_schedule must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}")
        need(self.num_sampling_steps <= self.diffusion_steps,
             "num_sampling_steps must be <= diffusion_steps")
        li = self.layer_indices
        need(len(li) >= 1 and len(set(li)) == len(li) and all(0 <= i < self.mar_depth for i in li),
             f"layer_indices must be distinct blocks in 0..{self.mar_depth - 1}, got {li}")
        need(self.mar_width % self.ca_reduction == 0,
             f"mar_width {self.mar_width} must be divisible by ca_reduction {self.ca_reduction}")
        need(self.sa_kernel % 2 == 1, f"sa_kernel must be odd, got {self.sa_kernel}")
