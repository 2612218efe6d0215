"""AR-Seg configuration: one flat, JSON-able dataclass describing the whole model.

AR-Seg (Chen et al., "Autoregressive Medical Image Segmentation via Next-Scale Mask Prediction")
has three parts, all sized by :class:`ArSegConfig`:

* ``image_encoder``: the MedSAM/SAM ViT-B image encoder (``encoder_kind="sam_vit_b"``, 1024² input,
  [B, 256, 64, 64] embedding) or a small CNN+ViT encoder for CPU use (``encoder_kind="light"``);
* ``vq``: the multi-scale mask autoencoder (LDM conv encoder/decoder + VAR-style residual quantiser
  over ``patch_nums`` scales of the ``latent_size``² latent);
* ``segmentor``: adapter (``f = MLP(E) + SVD(E)``, paper Eq. 2) producing ``num_cond_tokens``
  conditioning tokens, then a next-scale transformer with AdaLN class conditioning.

Every field is JSON-able (tuples become lists in JSON and are turned back into tuples here), so
``ArSegConfig(**json.loads(json.dumps(asdict(cfg))))`` rebuilds ``cfg``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["ArSegConfig", "ENCODER_KINDS"]

ENCODER_KINDS = ("sam_vit_b", "light")


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclass
class ArSegConfig:
    # ---- image input -------------------------------------------------------------------------
    img_size: int = 1024
    #: channels of the slice given to ``embed`` (1 = grey; the SAM encoder repeats it to 3)
    in_chans: int = 1
    #: target classes for AdaLN conditioning (class ids 0 .. num_classes-1)
    num_classes: int = 3
    encoder_kind: str = "sam_vit_b"
    #: channels C_e of the image embedding [B, C_e, h, w] (SAM neck: 256)
    embed_dim: int = 256
    #: False: the image encoder is frozen in stage 2 (MedSAM); True: trained with the segmentor
    train_image_encoder: bool = False

    # ---- SAM ViT image encoder (encoder_kind == "sam_vit_b") ------------------------------------
    sam_width: int = 768
    sam_depth: int = 12
    sam_heads: int = 12
    sam_patch_size: int = 16
    sam_window_size: int = 14
    sam_global_attn_indexes: tuple = (2, 5, 8, 11)
    sam_mlp_ratio: float = 4.0

    # ---- light image encoder (encoder_kind == "light") ------------------------------------------
    #: output channels of the stride-2 conv stages (the stride is 2 ** len(light_widths))
    light_widths: tuple = (32, 64, 96, 128)
    light_dim: int = 128
    light_depth: int = 2
    light_heads: int = 4
    #: width of the stage-0 segmentation head on the image embedding (0 = no head). With a head the
    #: image encoder can be pre-trained as a segmentation network (per-pixel classes decoded from the
    #: embedding alone, no skip connections) and then frozen for stage 2: a CT-trained encoder in
    #: place of the paper's MedSAM (not in the paper; see ``light_encoder.EmbeddingSegHead``)
    seg_head_dim: int = 0

    # ---- multi-scale mask autoencoder -----------------------------------------------------------
    mask_size: int = 128
    vq_ch: int = 32
    vq_ch_mult: tuple = (1, 1, 2, 2, 4)
    vq_num_res_blocks: int = 2
    vq_z_channels: int = 128
    vq_norm_groups: int = 32
    vocab_size: int = 1024
    code_dim: int = 32
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 7, 8)
    #: number of shared phi convs (4: scales {0,1},{2,3},{4,5},{6,7} for 8 scales)
    phi_shared: int = 4
    phi_ratio: float = 0.5
    vq_beta: float = 0.25

    # ---- segmentor ------------------------------------------------------------------------------
    #: conditioning tokens produced by the adapter (a square grid: 64 = 8 x 8)
    num_cond_tokens: int = 64
    #: SVD branch: keep the leading singular directions holding this fraction of sum(sigma) ...
    svd_energy: float = 0.95
    #: ... but at most this many
    svd_max_rank: int = 64
    width: int = 256
    depth: int = 8
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        self.sam_global_attn_indexes = tuple(int(i) for i in self.sam_global_attn_indexes)
        self.light_widths = tuple(int(i) for i in self.light_widths)
        self.vq_ch_mult = tuple(int(i) for i in self.vq_ch_mult)
        self.patch_nums = tuple(int(i) for i in self.patch_nums)
        self._validate()

    # ---- derived sizes ----------------------------------------------------------------------------
    @property
    def latent_size(self) -> int:
        """Side of the mask latent (8 for a 128² mask and 5 levels)."""
        return self.mask_size // 2 ** (len(self.vq_ch_mult) - 1)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def num_tokens(self) -> int:
        """Mask tokens over all scales (204 for patch_nums 1..8)."""
        return sum(p * p for p in self.patch_nums)

    @property
    def cond_grid(self) -> int:
        return math.isqrt(self.num_cond_tokens)

    @property
    def embed_grid(self) -> int:
        """Side h = w of the image embedding."""
        if self.encoder_kind == "sam_vit_b":
            return self.img_size // self.sam_patch_size
        return self.img_size // 2 ** len(self.light_widths)

    @property
    def encoder_in_chans(self) -> int:
        return 3 if self.encoder_kind == "sam_vit_b" else self.in_chans

    # ---- validation -------------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"ArSegConfig: {msg}")

        need(self.encoder_kind in ENCODER_KINDS, f"encoder_kind must be one of {ENCODER_KINDS}")
        for name in ("img_size", "in_chans", "num_classes", "embed_dim", "mask_size", "vq_ch",
                     "vq_num_res_blocks", "vq_z_channels", "vq_norm_groups", "vocab_size",
                     "code_dim", "phi_shared", "num_cond_tokens", "svd_max_rank", "width",
                     "depth", "heads"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name} must be a positive int, got {v!r}")
        if self.encoder_kind == "sam_vit_b":
            need(self.in_chans in (1, 3), "the SAM encoder takes 1 (repeated) or 3 channels")
            need(self.img_size % self.sam_patch_size == 0, "img_size must be a multiple of sam_patch_size")
            need(self.sam_width % self.sam_heads == 0, "sam_width must be divisible by sam_heads")
            need(all(0 <= i < self.sam_depth for i in self.sam_global_attn_indexes),
                 "sam_global_attn_indexes out of range")
            need(self.sam_window_size >= 1, "sam_window_size must be >= 1")
        else:
            need(len(self.light_widths) >= 1 and all(w >= 1 for w in self.light_widths),
                 "light_widths must be positive")
            need(self.img_size % 2 ** len(self.light_widths) == 0,
                 "img_size must be a multiple of 2 ** len(light_widths)")
            need(self.light_dim % self.light_heads == 0, "light_dim must be divisible by light_heads")
            need(self.light_depth >= 0, "light_depth must be >= 0")
        need(isinstance(self.seg_head_dim, int) and not isinstance(self.seg_head_dim, bool)
             and self.seg_head_dim >= 0, "seg_head_dim must be an int >= 0")
        need(len(self.vq_ch_mult) >= 1 and all(m >= 1 for m in self.vq_ch_mult), "bad vq_ch_mult")
        need(_is_pow2(self.mask_size // self.latent_size) and self.mask_size % self.latent_size == 0
             and self.latent_size >= 1, "mask_size must be latent_size * 2 ** (len(vq_ch_mult) - 1)")
        for c in {self.vq_ch * m for m in self.vq_ch_mult}:
            need(c % self.vq_norm_groups == 0, f"vq channels {c} not divisible by vq_norm_groups")
        pn = self.patch_nums
        need(len(pn) >= 1 and all(a < b for a, b in zip(pn, pn[1:])) and pn[0] >= 1,
             "patch_nums must be strictly increasing positive ints")
        need(pn[-1] == self.latent_size,
             f"patch_nums[-1] ({pn[-1]}) must equal the latent size ({self.latent_size})")
        need(self.phi_shared <= len(pn), "phi_shared must be <= number of scales")
        need(0.0 <= self.phi_ratio <= 1.0, "phi_ratio must be in [0, 1]")
        need(math.isqrt(self.num_cond_tokens) ** 2 == self.num_cond_tokens,
             "num_cond_tokens must be a perfect square (cond_grid ** 2)")
        need(0.0 < self.svd_energy <= 1.0, "svd_energy must be in (0, 1]")
        need(self.width % self.heads == 0, "width must be divisible by heads")
        need(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        need(self.mlp_ratio > 0 and self.sam_mlp_ratio > 0, "mlp ratios must be positive")
