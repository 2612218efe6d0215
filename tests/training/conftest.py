"""Fixtures of the training tests: the tiny registered net and a fast training config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _tinynet import PHANTOM_SHAPE, PHANTOM_SPACING, register  # noqa: E402


@pytest.fixture
def tiny_cfg(tmp_path):
    register()

    def make(**kw):
        d = dict(model="tinyseg_small", data=["phantom:3"], phantom_shape=PHANTOM_SHAPE,
                 phantom_spacing=PHANTOM_SPACING, steps=20, batch_size=4, recipe="adamw", lr=3e-3,
                 out=str(tmp_path / "tiny.safetensors"), device="cpu", seed=0, quiet=True,
                 val_fraction=0.34, img_size=32, threads=1)
        d.update(kw)
        return d

    return make
