"""A tiny registered conv net for the training tests (family "tinyseg")."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

#: a small phantom for fast training tests: (z, y, x) voxels and mm
PHANTOM_SHAPE = [12, 64, 64]
PHANTOM_SPACING = [3.0, 3.5, 3.5]


@dataclass
class TinySegConfig:
    num_classes: int = 3
    img_size: int = 32
    in_chans: int = 1
    width: int = 12
    #: dropout before the classifier (draws from the global torch RNG in training mode)
    dropout: float = 0.0


class TinySeg(nn.Module):
    def __init__(self, cfg: TinySegConfig):
        super().__init__()
        w = cfg.width
        self.net = nn.Sequential(
            nn.Conv2d(cfg.in_chans, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=4, dilation=4), nn.ReLU(),
            nn.Dropout2d(cfg.dropout),
            nn.Conv2d(w, cfg.num_classes, 1),
        )

    def forward(self, x):
        return self.net(x)


def register() -> None:
    """Register the family (served by the segmentation predictor) once per process."""
    from napari_genseg.models import registry
    from napari_genseg.predictors import SegmentationPredictor, register_predictor

    if "tinyseg" not in {f.name for f in registry.list_families()}:
        registry.register_family("tinyseg", TinySegConfig, TinySeg, "tinyseg_small", description="test net")
        registry.register_config("tinyseg", "tinyseg_small", TinySegConfig())
    register_predictor("tinyseg", SegmentationPredictor)
