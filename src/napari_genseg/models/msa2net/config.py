"""MSA²Net configuration (a flat, JSON-able dataclass).

Paper: "MSA²Net: Multi-scale Adaptive Attention-guided Network for Medical Image Segmentation"
(Kolahi et al., BMVC 2024). Official code: https://github.com/xmindflow/MSA-2Net (MIT).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["Msa2NetConfig", "VARIANTS", "TOKEN_LAYOUTS"]

#: ``paper``: decoder_2 (and the unused decoder_3) use MASAG + 2 DAE-Former DualTransformerBlocks,
#: as in the paper (112.77 M parameters at the paper configuration).
#: ``released``: what the released code builds, because ``MyDecoderLayerDAEFormer`` defines
#: ``__init__``/``forward`` twice and the second definitions win: LKA blocks everywhere and a
#: plain add instead of MASAG in decoder_2 (93.66 M parameters).
VARIANTS = ("paper", "released")

#: ``spatial``: tokens [B, H*W, C] <-> images [B, C, H, W] by a transpose (correct layout; use it
#: for models trained here). ``official``: the official code's raw ``.view`` reinterpretation of
#: the same memory (MASAG and the LKA blocks then convolve a scrambled layout); needed only to
#: reproduce the outputs of imported official weights.
TOKEN_LAYOUTS = ("spatial", "official")


@dataclass
class Msa2NetConfig:
    """Architecture of one MSA²Net.

    Encoder channel widths and stage resolutions are read from the timm model at build time
    (feature maps at strides 4, 8, 16, 32), so any timm MaxViT/MaxxViT name works.
    """

    #: timm model name of the encoder (always built with ``pretrained=False``)
    encoder: str = "maxvit_rmlp_small_rw_224"
    #: square input side in pixels; a multiple of 32 (the MaxViT window is ``img_size // 32``)
    img_size: int = 224
    #: 1 (grey CT, repeated to 3 channels inside the model, as the official code does) or 3
    in_chans: int = 1
    num_classes: int = 9
    variant: str = "paper"
    token_layout: str = "spatial"
    #: build the modules the official model owns but never runs (decoder_3's skip gate,
    #: LayerNorm and block pair; decoder_2's MASAG in the released variant; the encoder's
    #: 1->3 channel conv). Needed for the paper's parameter count and for loading official
    #: checkpoints without unexpected keys; they never change the output.
    keep_unused_modules: bool = True
    #: hidden-width ratio of the LKA MLP and the DAE-Former MixFFN
    mlp_ratio: int = 4
    #: heads of the DAE-Former channel (transpose) attention
    channel_attn_heads: int = 8
    #: initial value of the LKA blocks' layer scales
    layer_scale_init: float = 1e-2

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ValueError("encoder must be a timm model name")
        for name in ("img_size", "in_chans", "num_classes", "mlp_ratio", "channel_attn_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.img_size <= 0 or self.img_size % 32:
            raise ValueError(f"img_size must be a positive multiple of 32, got {self.img_size}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.token_layout not in TOKEN_LAYOUTS:
            raise ValueError(f"token_layout must be one of {TOKEN_LAYOUTS}, got {self.token_layout!r}")
        if not isinstance(self.keep_unused_modules, bool):
            raise TypeError("keep_unused_modules must be a bool")
        if self.mlp_ratio < 1 or self.channel_attn_heads < 1:
            raise ValueError("mlp_ratio and channel_attn_heads must be >= 1")
        self.layer_scale_init = float(self.layer_scale_init)
