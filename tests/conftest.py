"""Shared fixtures: the ../shared/data folder, and a test double model (tests only)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "real"


@pytest.fixture
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA} (clone the project beside ../shared)")
    return DATA


@pytest.fixture
def abdomen_ct(shared_data) -> Path:
    p = shared_data / "ct-abdomen" / "ct_abdomen_small.nii.gz"
    if not p.is_file():
        pytest.skip(f"{p} missing")
    return p


@dataclass
class ThresholdConfig:
    """Test double config: class k where the normalised input lies in the k-th band."""

    num_classes: int = 3
    img_size: int = 32
    in_chans: int = 1
    delay_s: float = 0.0


class ThresholdNet(nn.Module):
    """Test double: logits from fixed intensity bands, plus one learnable scalar (for loaders)."""

    def __init__(self, cfg: ThresholdConfig):
        super().__init__()
        self.cfg = cfg
        self.gain = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        import time

        if self.cfg.delay_s:
            time.sleep(self.cfg.delay_s)
        k = self.cfg.num_classes
        centers = torch.linspace(0, 1, k, device=x.device).view(1, k, 1, 1)
        return -self.gain * (x[:, :1] - centers).abs()


def _register():
    from napari_genseg.models import registry

    if "testdouble" not in {f.name for f in registry.list_families()}:
        registry.register_family("testdouble", ThresholdConfig, ThresholdNet, "testdouble_small",
                                 description="test double")
        registry.register_config("testdouble", "testdouble_small", ThresholdConfig())


@pytest.fixture
def double_checkpoint(tmp_path) -> Path:
    """A project-format checkpoint of the test double (3 classes)."""
    from napari_genseg.models.checkpoints import save_checkpoint

    _register()
    cfg = ThresholdConfig()
    return save_checkpoint(
        tmp_path / "double.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
        ["background", "soft", "dense"],
        {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "resize": "resize"},
        provenance={"test": True},
    )


@pytest.fixture
def slow_double_checkpoint(tmp_path) -> Path:
    from napari_genseg.models.checkpoints import save_checkpoint

    _register()
    cfg = ThresholdConfig(delay_s=0.15)
    return save_checkpoint(
        tmp_path / "slow.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
        ["background", "soft", "dense"],
        {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "resize": "resize"},
    )
