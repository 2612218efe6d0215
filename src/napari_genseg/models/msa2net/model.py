"""MSA²Net model: timm MaxViT encoder + 4-stage attention-gated decoder.

Paper: "MSA²Net: Multi-scale Adaptive Attention-guided Network for Medical Image Segmentation"
(Kolahi et al., BMVC 2024). Official code: https://github.com/xmindflow/MSA-2Net (MIT),
``networks/msa2net.py``. Module names equal the official ones (``backbone.backbone.*`` are timm's
MaxViT keys, ``decoder_{3,2,1,0}.*``), so official checkpoints load without renaming.

Data flow at the paper configuration (224², maxvit_rmlp_small_rw_224), deepest first::

    x [B,1,224,224] -> repeat to 3 channels -> MaxViT: f0 96@56², f1 192@28², f2 384@14², f3 768@7²
    decoder_3: tokens(f3) [B,49,768]   -> PatchExpand               -> [B,196,384]
    decoder_2: skip f2, MASAG + 2 DAE-Former blocks (paper) or plain add + 2 LKA blocks (released)
               -> PatchExpand -> [B,784,192]
    decoder_1: skip f1, MASAG + 2 LKA blocks -> PatchExpand -> [B,3136,96]
    decoder_0: skip f0, MASAG + 2 LKA blocks -> FinalPatchExpand_X4 [B,50176,96]
               -> [B,96,224,224] -> 1x1 conv -> logits [B,num_classes,224,224]
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import MASAG, DualTransformerBlock, FinalPatchExpandX4, LKABlock, PatchExpand
from .config import Msa2NetConfig

__all__ = ["Msa2NetEncoder", "Msa2NetDecoderLayer", "MSA2Net", "build_msa2net"]


class Msa2NetEncoder(nn.Module):
    """timm MaxViT trunk returning its four stage outputs (strides 4, 8, 16, 32).

    x: [B, 3, S, S] -> [f0, f1, f2, f3] with fi: [B, dims[i], S / 2^(i+2), S / 2^(i+2)].
    The final LayerNorm2d (``backbone.norm``) applies to the last stage only, as in the official
    backbone (and timm's ``forward_features``).
    """

    def __init__(self, name: str, img_size: int, keep_unused_modules: bool = False):
        super().__init__()
        import timm  # local import: importing the package stays cheap

        self.backbone = timm.create_model(
            name, pretrained=False, num_classes=0, global_pool="", img_size=img_size
        )
        for attr in ("stem", "stages", "norm"):
            if not hasattr(self.backbone, attr):
                raise ValueError(f"encoder {name!r} is not a timm MaxViT/MaxxViT (no .{attr})")
        if len(self.backbone.stages) != 4:
            raise ValueError(f"encoder {name!r} has {len(self.backbone.stages)} stages, need 4")
        info = self.backbone.feature_info[-4:]
        if [f["reduction"] for f in info] != [4, 8, 16, 32]:
            raise ValueError(f"encoder {name!r}: stage strides {[f['reduction'] for f in info]}")
        self.dims: tuple[int, ...] = tuple(int(f["num_chs"]) for f in info)
        if keep_unused_modules:
            # the official backbone owns a 1->3 channel conv block that its forward never reaches
            # (MSA2Net repeats grey input to 3 channels first); kept only for checkpoint parity
            self.conv = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.backbone.stem(x)
        feats = []
        for stage in self.backbone.stages:
            x = stage(x)
            feats.append(x)
        feats[-1] = self.backbone.norm(feats[-1])
        return feats


class Msa2NetDecoderLayer(nn.Module):
    """One decoder stage (official ``MyDecoderLayerLKA`` / ``MyDecoderLayerDAEFormer``).

    forward(x1, skip, h, w): x1 tokens [B, h*w, C] from the deeper stage (row-major over h x w),
    skip the encoder map [B, C, h, w] or None.
    - no skip: PatchExpand only -> [B, 4hw, C/2]
    - skip: G = x1_linear(x1), X = skip (both as images); y = G + MASAG(X, G) (or G + X when not
      gated); LayerNorm(C); 2 blocks (DAE on tokens or LKA on images); then PatchExpand ->
      [B, 4hw, C/2], or for the last stage FinalPatchExpand_X4 + 1x1 conv -> [B, K, 4h, 4w].
    ``token_layout="official"`` reproduces the official raw ``.view`` between [B, N, C] and
    [B, C, H, W] (same memory, scrambled geometry); ``"spatial"`` uses a proper transpose.
    """

    def __init__(
        self,
        dim: int,
        *,
        block: str,
        gated: bool,
        has_skip: bool = True,
        is_last: bool = False,
        num_classes: int = 9,
        token_layout: str = "spatial",
        keep_unused_modules: bool = False,
        mlp_ratio: int = 4,
        channel_attn_heads: int = 8,
        layer_scale_init: float = 1e-2,
    ):
        super().__init__()
        if block not in ("dae", "lka"):
            raise ValueError(f"block must be 'dae' or 'lka', got {block!r}")
        self.block = block
        self.gated = gated
        self.has_skip = has_skip
        self.is_last = is_last
        self.token_layout = token_layout
        if has_skip or keep_unused_modules:
            self.x1_linear = nn.Linear(dim, dim)
            if gated or keep_unused_modules:
                self.ag_attn = MASAG(dim)
            self.ag_attn_norm = nn.LayerNorm(dim)
            if block == "dae":
                self.tran_layer1 = DualTransformerBlock(dim, mlp_ratio, channel_attn_heads)
                self.tran_layer2 = DualTransformerBlock(dim, mlp_ratio, channel_attn_heads)
            else:
                self.layer_lka_1 = LKABlock(dim, mlp_ratio, layer_scale_init)
                self.layer_lka_2 = LKABlock(dim, mlp_ratio, layer_scale_init)
        self.layer_up = FinalPatchExpandX4(dim) if is_last else PatchExpand(dim)
        self.last_layer = nn.Conv2d(dim, num_classes, 1) if is_last else None
        self._init_weights()

    def _init_weights(self) -> None:
        # official decoder init: xavier-uniform Linear/Conv2d weights, zero biases, unit LayerNorms
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _to_image(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, h*w, C] -> [B, C, h, w]."""
        b, n, c = tokens.shape
        if self.token_layout == "official":
            return tokens.reshape(b, c, h, w)  # raw reinterpretation, as the official .view
        return tokens.transpose(1, 2).reshape(b, c, h, w)

    def _to_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, h*w, C]."""
        b, c, h, w = image.shape
        if self.token_layout == "official":
            return image.reshape(b, h * w, c)  # raw reinterpretation, as the official .view
        return image.flatten(2).transpose(1, 2)

    def forward(
        self, x1: torch.Tensor, skip: torch.Tensor | None, h: int, w: int
    ) -> torch.Tensor:
        if not self.has_skip:
            return self.layer_up(x1, h, w)
        if skip is None:
            raise ValueError("this decoder stage needs its encoder skip feature")
        b, c = skip.shape[:2]
        g = self._to_image(self.x1_linear(x1), h, w)
        if self.token_layout == "official":
            # official: skip.permute(0,2,3,1) -> .view(B, h*w, C) -> .view(B, C, h, w)
            x = skip.permute(0, 2, 3, 1).reshape(b, c, h, w)
        else:
            x = skip
        y = g + (self.ag_attn(x, g) if self.gated else x)
        y = self.ag_attn_norm(y.permute(0, 2, 3, 1))  # [B, h, w, C]
        if self.block == "dae":
            t = y.reshape(b, h * w, c)  # image -> tokens by a proper flatten, in both layouts
            t = self.tran_layer2(self.tran_layer1(t, h, w), h, w)
        else:
            img = self.layer_lka_2(self.layer_lka_1(y.permute(0, 3, 1, 2)))
            t = self._to_tokens(img)
        up = self.layer_up(t, h, w)
        if not self.is_last:
            return up
        return self.last_layer(up.reshape(b, 4 * h, 4 * w, c).permute(0, 3, 1, 2))


class MSA2Net(nn.Module):
    """MSA²Net: x [B, in_chans, S, S] float -> logits [B, num_classes, S, S] (S = ``img_size``).

    Grey input (1 channel) is repeated to 3 channels before the encoder, as the official code.
    """

    def __init__(self, config: Msa2NetConfig):
        super().__init__()
        self.config = config
        keep = config.keep_unused_modules
        self.backbone = Msa2NetEncoder(config.encoder, config.img_size, keep)
        dims = self.backbone.dims
        for shallow, deep in zip(dims[:-1], dims[1:]):
            if deep != 2 * shallow:
                raise ValueError(f"encoder widths {dims} must double per stage (PatchExpand halves them)")
        deep_block = "dae" if config.variant == "paper" else "lka"
        common = dict(
            num_classes=config.num_classes,
            token_layout=config.token_layout,
            keep_unused_modules=keep,
            mlp_ratio=config.mlp_ratio,
            channel_attn_heads=config.channel_attn_heads,
            layer_scale_init=config.layer_scale_init,
        )
        self.decoder_3 = Msa2NetDecoderLayer(dims[3], block=deep_block, gated=False, has_skip=False, **common)
        self.decoder_2 = Msa2NetDecoderLayer(
            dims[2], block=deep_block, gated=config.variant == "paper", **common
        )
        self.decoder_1 = Msa2NetDecoderLayer(dims[1], block="lka", gated=True, **common)
        self.decoder_0 = Msa2NetDecoderLayer(dims[0], block="lka", gated=True, is_last=True, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(
                f"expected input [B, {self.config.in_chans}, H, W], got {tuple(x.shape)}"
            )
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        f0, f1, f2, f3 = self.backbone(x)
        h, w = f3.shape[-2:]
        t = f3.flatten(2).transpose(1, 2)  # [B, h*w, C3], row-major (official permute + view)
        t = self.decoder_3(t, None, h, w)
        t = self.decoder_2(t, f2, 2 * h, 2 * w)
        t = self.decoder_1(t, f1, 4 * h, 4 * w)
        return self.decoder_0(t, f0, 8 * h, 8 * w)


def build_msa2net(config: Msa2NetConfig) -> MSA2Net:
    """Registry build function."""
    if not isinstance(config, Msa2NetConfig):
        raise TypeError(f"expected Msa2NetConfig, got {type(config).__name__}")
    return MSA2Net(config)
