"""AR-Seg: autoregressive segmentation by next-scale mask prediction (clean-room, pure torch).

Paper: Chen, Wang, Chen, Shan, "Autoregressive Medical Image Segmentation via Next-Scale Mask
Prediction" (MICCAI 2025). Upstream: github.com/takimailto/AR-Seg (mask autoencoder; no licence,
nothing copied), ideas from VAR (FoundationVision/VAR) and segment-anything (image encoder).

Modules: ``config`` (ArSegConfig), ``maskvq`` (multi-scale mask autoencoder), ``sam_encoder``
(MedSAM/SAM ViT-B), ``light_encoder`` (small CPU encoder), ``segmentor`` (SVD adapter + AdaLN
next-scale transformer, KV cache), ``sampling`` (ArSeg model, batched KV-cached sampling),
``importer`` (official checkpoint keys).

Registered configurations: ``arseg_paper`` (MedSAM ViT-B, 1024², the paper's sizes),
``arseg_light`` (small encoder at 128², trained with the segmentor), ``arseg_ct`` (the shipped
demo's: the small encoder pre-trained as a CT segmentation network in a stage 0 and frozen, in place
of MedSAM), ``arseg_tiny`` (tests).
"""

from __future__ import annotations

from .. import registry
from . import config, importer, light_encoder, maskvq, sam_encoder, sampling, segmentor
from .config import ArSegConfig
from .importer import import_official
from .maskvq import MaskVQ
from .sampling import DEFAULT_TEMPERATURES, ArSeg, default_temperatures, prefix_scales, sample_tokens
from .segmentor import KVCache, NextScaleSegmentor, block_causal_mask

__all__ = [
    "ArSeg",
    "ArSegConfig",
    "MaskVQ",
    "NextScaleSegmentor",
    "KVCache",
    "block_causal_mask",
    "sample_tokens",
    "prefix_scales",
    "import_official",
    "DEFAULT_TEMPERATURES",
    "default_temperatures",
    "CONFIGS",
    "PAPER_PARAMS",
    "config",
    "importer",
    "light_encoder",
    "maskvq",
    "sam_encoder",
    "sampling",
    "segmentor",
]

#: exact parameter count of ``arseg_paper`` (measured: MedSAM 89,670,912 + VQ 4,393,025 +
#: segmentor 7,386,624)
PAPER_PARAMS = 101_450_561

CONFIGS: dict[str, ArSegConfig] = {
    # MedSAM ViT-B encoder (frozen), mask autoencoder and transformer as in the paper / official
    # configs; 3 classes (BraTS NT/ED/ET; LIDC uses 1)
    "arseg_paper": ArSegConfig(),
    # CPU demo: small conv+ViT encoder trained with the segmentor, lighter autoencoder
    "arseg_light": ArSegConfig(
        img_size=128, in_chans=1, num_classes=8, encoder_kind="light", embed_dim=128,
        train_image_encoder=True, light_widths=(32, 64, 96, 128), light_dim=128, light_depth=2,
        light_heads=4, mask_size=128, vq_ch=16, vq_ch_mult=(1, 1, 2, 2, 4), vq_num_res_blocks=1,
        vq_z_channels=64, vq_norm_groups=8, vocab_size=512, code_dim=32, num_cond_tokens=64,
        svd_max_rank=32, width=192, depth=4, heads=6,
    ),
    # CPU demo on CT (models/arseg_demo.md): the light encoder pre-trained as a segmentation network
    # (stage 0, head on the embedding) and frozen in stage 2, standing in for MedSAM
    "arseg_ct": ArSegConfig(
        img_size=128, in_chans=1, num_classes=2, encoder_kind="light", embed_dim=128,
        train_image_encoder=False, light_widths=(32, 64, 96, 128), light_dim=128, light_depth=2,
        light_heads=4, seg_head_dim=64, mask_size=128, vq_ch=16, vq_ch_mult=(1, 1, 2, 2, 4),
        vq_num_res_blocks=1, vq_z_channels=64, vq_norm_groups=8, vocab_size=512, code_dim=32,
        num_cond_tokens=64, svd_max_rank=32, width=192, depth=4, heads=6,
    ),
    # arseg_ct with a 16x16 mask latent (VQ downsampling 8 instead of 16; 9 scales up to 16, 655
    # tokens): whole-slice masks at 3 mm put a 48 mm cell behind each 8x8 token, a 24 mm one here
    "arseg_ct16": ArSegConfig(
        img_size=128, in_chans=1, num_classes=2, encoder_kind="light", embed_dim=128,
        train_image_encoder=False, light_widths=(32, 64, 96, 128), light_dim=128, light_depth=2,
        light_heads=4, seg_head_dim=64, mask_size=128, vq_ch=16, vq_ch_mult=(1, 2, 2, 4),
        vq_num_res_blocks=1, vq_z_channels=64, vq_norm_groups=8, vocab_size=512, code_dim=32,
        patch_nums=(1, 2, 3, 4, 6, 8, 10, 13, 16),
        num_cond_tokens=64, svd_max_rank=32, width=192, depth=4, heads=6,
    ),
    # fast tests: every part present, everything tiny (still 8 scales / 204 tokens)
    "arseg_tiny": ArSegConfig(
        img_size=64, in_chans=1, num_classes=3, encoder_kind="light", embed_dim=32,
        train_image_encoder=True, light_widths=(8, 16, 16, 16), light_dim=32, light_depth=1,
        light_heads=2, mask_size=32, vq_ch=8, vq_ch_mult=(1, 2, 2), vq_num_res_blocks=1,
        vq_z_channels=16, vq_norm_groups=4, vocab_size=64, code_dim=8, num_cond_tokens=16,
        svd_max_rank=8, width=64, depth=2, heads=4, dropout=0.0,
    ),
}


def build(cfg: ArSegConfig) -> ArSeg:
    return ArSeg(cfg)


registry.register_family(
    "arseg",
    ArSegConfig,
    build,
    default_config="arseg_light",
    description="AR-Seg: next-scale autoregressive mask prediction with N-sample consensus",
    import_official=import_official,
    kind="arseg",
)
registry.register_config(
    "arseg", "arseg_paper", CONFIGS["arseg_paper"],
    description="paper: MedSAM ViT-B 1024² encoder, 128² mask, 8 scales, 8x256 transformer",
    paper=True, expected_params=PAPER_PARAMS,
)
registry.register_config(
    "arseg", "arseg_light", CONFIGS["arseg_light"],
    description="CPU demo: light conv+ViT encoder at 128², 4x192 transformer",
)
registry.register_config(
    "arseg", "arseg_ct", CONFIGS["arseg_ct"],
    description="CPU demo on CT: light encoder pre-trained as a segmenter (stage 0) and frozen",
)
registry.register_config(
    "arseg", "arseg_ct16", CONFIGS["arseg_ct16"],
    description="arseg_ct with a 16x16 mask latent (9 scales, 655 tokens)",
)
registry.register_config(
    "arseg", "arseg_tiny", CONFIGS["arseg_tiny"],
    description="tiny variant for tests",
)
