"""Shared fixtures: the ../shared/data folder, and a test double model (tests only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _doubles import ThresholdConfig, ThresholdNet, register_double  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "real"


def pytest_runtest_teardown(item):
    """After a viewer test the process holds Mesa's LLVM (Xvfb's llvmpipe): a later test that
    imports timm would load triton and crash (see napari_genseg.ui._triton); apply the docks' guard."""
    if item.get_closest_marker("gui") is not None:
        from napari_genseg.ui._triton import block_triton_if_unsafe

        block_triton_if_unsafe()


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


@pytest.fixture
def double_checkpoint(tmp_path) -> Path:
    """A project-format checkpoint of the test double (3 classes)."""
    from napari_genseg.models.checkpoints import save_checkpoint

    register_double()
    cfg = ThresholdConfig()
    return save_checkpoint(
        tmp_path / "double.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
        ["background", "soft", "dense"],
        {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "grid": "resize"},
        provenance={"test": True},
    )


@pytest.fixture
def slow_double_checkpoint(tmp_path) -> Path:
    from napari_genseg.models.checkpoints import save_checkpoint

    register_double()
    cfg = ThresholdConfig(delay_s=0.15)
    return save_checkpoint(
        tmp_path / "slow.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
        ["background", "soft", "dense"],
        {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "grid": "resize"},
    )


@pytest.fixture
def arseg_tiny_checkpoint(tmp_path) -> Path:
    """A project-format checkpoint of ``arseg_tiny`` with seeded random weights (classes:
    background, lesion, organ)."""
    import torch

    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import save_checkpoint

    entry = registry.get_entry("arseg_tiny")
    torch.manual_seed(0)
    model = registry.get_family("arseg").build(entry.config)
    return save_checkpoint(tmp_path / "arseg_tiny.safetensors", model, "arseg", "arseg_tiny", entry.config,
                           ["background", "lesion", "organ"], {"normalization": {"kind": "minmax"}, "grid": "resize"})
