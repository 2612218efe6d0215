"""MARSeg: masked autoregressive pre-training plus GPAF feature fusion for CT segmentation.

Paper: Hwang, Rhee, Kim, Viriyasaranon, Choi, "MARSeg: Enhancing Medical Image Segmentation with
MAR and Adaptive Feature Fusion" (MICCAI 2025). Upstream: github.com/Ewha-AI/MARSeg (MIT), built
on LTH14/mar (MIT) and the KL-16 AutoencoderKL of CompVis/latent-diffusion. Clean-room, pure torch.

Modules: ``config`` (MarSegConfig), ``autoencoder`` (KL-16 AutoencoderKL + LDM loss, stage 0),
``diffusion`` (MAR's diffusion loss head), ``mar`` (MAR trunk, masked pre-training, generation),
``head`` (GPAF, FPN head), ``model`` (MarSeg, the segmentation model), ``pretrain`` (stage-1
model and its hand-over to stage 2), ``importer`` (official checkpoints).

Registered configurations: ``marseg_paper`` (the official mar_base model at 256², 3 classes:
244,648,667 parameters, 206,928,827 of them run by segmentation), ``marseg_demo`` (small CPU
configuration), ``marseg_tiny`` (tests).
"""

from __future__ import annotations

from .. import registry
from . import autoencoder, config, diffusion, head, importer, mar, model, pretrain
from .autoencoder import DiagonalGaussian, KLAutoencoder
from .config import MarSegConfig
from .diffusion import DiffusionHead
from .head import GPAF, FPNHead
from .importer import export_official, import_kl16_autoencoder, import_official, load_official
from .mar import MAR, sample_mask_ratio
from .model import STAGE2_GROUPS, MarSeg, build_marseg
from .pretrain import MarPretrainer

__all__ = [
    "MarSeg",
    "MarSegConfig",
    "MAR",
    "MarPretrainer",
    "KLAutoencoder",
    "DiagonalGaussian",
    "DiffusionHead",
    "GPAF",
    "FPNHead",
    "STAGE2_GROUPS",
    "build_marseg",
    "import_official",
    "import_kl16_autoencoder",
    "export_official",
    "load_official",
    "sample_mask_ratio",
    "CONFIGS",
    "PAPER_PARAMS",
    "PAPER_INFERENCE_PARAMS",
    "PAPER_BN_STATS",
    "autoencoder",
    "config",
    "diffusion",
    "head",
    "importer",
    "mar",
    "model",
    "pretrain",
]

#: parameters of the official model (mar_base, 256², 3 classes, diffusion head d6 w1024): KL-16
#: encoder 28,265,760 + quant_conv 528 + MAR 207,159,072 (diffusion head 35,749,920 of it) + GPAF
#: 6,599,048 + FPN head 2,624,259 (its unused 3x3 convs 1,770,240 of it)
PAPER_PARAMS = 244_648_667
#: the official state dict's BatchNorm running means and variances (plus 8 num_batches_tracked)
PAPER_BN_STATS = 8_192
#: parameters the segmentation forward runs (no diffusion head, its position embedding, mask
#: token, class embedding, nor the 3 unused 3x3 convs)
PAPER_INFERENCE_PARAMS = 206_928_827

CONFIGS: dict[str, MarSegConfig] = {
    # the official model of the fixture / released script: mar_base, KL-16, 256², 3 classes
    "marseg_paper": MarSegConfig(),
    # CPU demo: KL tokenizer at 1/4 width, a 6+6-block MAR of width 192, 16 buffer tokens
    # (8,681,371 parameters, 17.4 MB in fp16; 7,207,483 run by segmentation)
    "marseg_demo": MarSegConfig(
        img_size=256, in_chans=3, num_classes=3, vae_ch=32, vae_ch_mult=(1, 1, 2, 2, 4),
        vae_num_res_blocks=1, vae_attn_levels=(4,), vae_embed_dim=16, vae_norm_groups=8,
        mar_width=192, mar_depth=6, mar_heads=3, buffer_size=16, class_num=1,
        diffloss_depth=3, diffloss_width=256, layer_indices=(2, 3, 4, 5), fuse_dim=64,
        ca_reduction=16,
    ),
    # the demo with a KL-8 tokenizer: 32x32 tokens at 256² (12 mm cells at 1.5 mm pixels instead of
    # 24 mm). The FPN head predicts at the token grid, and at 16x16 that grid alone caps the spleen's
    # Dice near 0.81 (benchmarks/logit_grid_cap.py); at 32x32 near 0.95.
    "marseg_demo_kl8": MarSegConfig(
        img_size=256, in_chans=3, num_classes=3, vae_ch=32, vae_ch_mult=(1, 2, 2, 4),
        vae_num_res_blocks=1, vae_attn_levels=(3,), vae_embed_dim=16, vae_norm_groups=8,
        mar_width=192, mar_depth=6, mar_heads=3, buffer_size=16, class_num=1,
        diffloss_depth=3, diffloss_width=256, layer_indices=(2, 3, 4, 5), fuse_dim=64,
        ca_reduction=16,
    ),
    # fast tests: every part present (level attention, 2 GPAF layers, diffusion head), tiny
    "marseg_tiny": MarSegConfig(
        img_size=32, in_chans=3, num_classes=3, vae_ch=32, vae_ch_mult=(1, 1, 2), vae_num_res_blocks=1,
        vae_attn_levels=(2,), vae_embed_dim=4, vae_norm_groups=32, mar_width=128, mar_depth=2,
        mar_heads=2, buffer_size=4, class_num=3, diffloss_depth=2, diffloss_width=32,
        num_sampling_steps=10, layer_indices=(0, 1), fuse_dim=16, ca_reduction=8,
    ),
}

registry.register_family(
    "marseg",
    MarSegConfig,
    build_marseg,
    default_config="marseg_paper",
    description="MARSeg (MICCAI 2025): KL-16 tokenizer, MAR encoder/decoder pre-trained "
    "generatively, GPAF fusion, FPN head",
    import_official=import_official,
    kind="marseg",
)
registry.register_config(
    "marseg", "marseg_paper", CONFIGS["marseg_paper"],
    description="official mar_base model: KL-16 at 256², 12+12 blocks of 768, GPAF on blocks 8-11, "
    "3 classes (244.6 M parameters, 206.9 M run by segmentation)",
    paper=True, expected_params=PAPER_PARAMS,
)
registry.register_config(
    "marseg", "marseg_demo", CONFIGS["marseg_demo"],
    description="CPU demo: KL tokenizer ch 32, MAR 6+6 blocks of 192, background/liver/spleen",
)
registry.register_config(
    "marseg", "marseg_demo_kl8", CONFIGS["marseg_demo_kl8"],
    description="CPU demo with a KL-8 tokenizer: 32x32 tokens at 256² (logits on a 12 mm grid at 1.5 mm)",
)
registry.register_config(
    "marseg", "marseg_tiny", CONFIGS["marseg_tiny"],
    description="tiny variant for tests",
)
