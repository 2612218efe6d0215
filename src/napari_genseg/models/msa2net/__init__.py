"""MSA²Net: Multi-scale Adaptive Attention-guided Network for Medical Image Segmentation.

Paper: Kolahi et al., BMVC 2024. Official code: https://github.com/xmindflow/MSA-2Net (MIT).
A pure-torch re-implementation on timm's MaxViT, with an importer for official checkpoints of
both the paper variant (DAE-Former decoder_2) and the released code (LKA everywhere).

Importing this package registers the ``msa2net`` family and its configurations:
``msa2net_paper`` (112.77 M parameters), ``msa2net_released`` (93.66 M), ``msa2net_demo``
(small CPU-trainable model: liver/spleen) and ``msa2net_tiny`` (for tests).
"""

from __future__ import annotations

import dataclasses

from .. import registry
from .blocks import (
    MASAG,
    ChannelAttention,
    DualTransformerBlock,
    EfficientAttention,
    FinalPatchExpandX4,
    LKABlock,
    MixFFN,
    PatchExpand,
)
from .config import TOKEN_LAYOUTS, VARIANTS, Msa2NetConfig
from .importer import detect_variant, export_official, import_official
from .model import MSA2Net, Msa2NetDecoderLayer, Msa2NetEncoder, build_msa2net

__all__ = [
    "Msa2NetConfig",
    "VARIANTS",
    "TOKEN_LAYOUTS",
    "MSA2Net",
    "Msa2NetEncoder",
    "Msa2NetDecoderLayer",
    "build_msa2net",
    "import_official",
    "export_official",
    "detect_variant",
    "MASAG",
    "LKABlock",
    "DualTransformerBlock",
    "EfficientAttention",
    "ChannelAttention",
    "MixFFN",
    "PatchExpand",
    "FinalPatchExpandX4",
    "PAPER_PARAMS",
    "RELEASED_PARAMS",
]

#: exact parameter counts (measured; the spec's 112.77 M and 93.66 M)
PAPER_PARAMS = 112_767_981
RELEASED_PARAMS = 93_660_877

# ----------------------------------------------------------------------------------- variants

_PAPER = Msa2NetConfig(
    encoder="maxvit_rmlp_small_rw_224",
    img_size=224,
    in_chans=1,
    num_classes=9,
    variant="paper",
    token_layout="spatial",
    keep_unused_modules=True,
)
_RELEASED = dataclasses.replace(_PAPER, variant="released")
_DEMO = Msa2NetConfig(
    encoder="maxvit_rmlp_pico_rw_256",
    img_size=256,
    in_chans=1,
    num_classes=3,  # background, liver, spleen
    variant="paper",
    token_layout="spatial",
    keep_unused_modules=False,
)
_TINY = dataclasses.replace(_DEMO, img_size=64, num_classes=2)

registry.register_family(
    "msa2net",
    Msa2NetConfig,
    build_msa2net,
    default_config="msa2net_paper",
    description="MSA²Net (BMVC 2024): MaxViT encoder, MASAG skip gates, DAE-Former/LKA decoder",
    import_official=import_official,
    kind="segmentation",
)
registry.register_config(
    "msa2net",
    "msa2net_paper",
    _PAPER,
    description="paper configuration: maxvit_rmlp_small_rw_224, 224², 9 Synapse classes, "
    "DAE-Former decoder_2 (112.77 M parameters incl. the official code's unused modules)",
    paper=True,
    expected_params=PAPER_PARAMS,
)
registry.register_config(
    "msa2net",
    "msa2net_released",
    _RELEASED,
    description="as the released official code builds it: LKA blocks everywhere, no MASAG in "
    "decoder_2 (93.66 M parameters)",
    paper=True,
    expected_params=RELEASED_PARAMS,
)
registry.register_config(
    "msa2net",
    "msa2net_demo",
    _DEMO,
    description="CPU demo: maxvit_rmlp_pico_rw_256 at 256², background/liver/spleen, "
    "paper variant without unused modules (8.68 M parameters, 17 MB in fp16)",
)
registry.register_config(
    "msa2net",
    "msa2net_tiny",
    _TINY,
    description="smallest configuration exercising every block (pico encoder at 64², 2 classes); tests",
)
