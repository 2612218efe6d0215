"""The marker case of the post-processing tests (CLI and dock): a CT whose HU bands the test
double turns into a known raw mask, and a test-double checkpoint that declares a clean-up.

The double labels every voxel by its HU band (< -100: 0, -100..100: "soft", > 100: "dense").
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

SPACING = (2.0, 1.0, 1.0)  # (z, y, x) mm: 2 mm^3 per voxel
ML = 2.0 / 1000.0
ORGAN = (slice(2, 10), slice(6, 20), slice(4, 14))  # 8 * 14 * 10 = 1120 voxels, patient's right
HOLE = (slice(5, 7), slice(10, 13), slice(7, 10))  # 18 voxels of air inside it
STRAY = (slice(3, 5), slice(24, 28), slice(20, 25))  # 40 voxels of soft tissue apart from it
DENSE = (slice(2, 4), slice(24, 26), slice(4, 6))  # an undeclared class


def _ct(left: bool = False) -> np.ndarray:
    """Display (z, y, x) HU: body at -200 HU (background class, but body for the midline)."""
    ct = np.full((12, 32, 32), -1000, np.int16)
    ct[:, 2:30, 2:30] = -200
    ct[ORGAN] = 0
    ct[HOLE] = -1000
    ct[STRAY] = 0
    ct[DENSE] = 900
    return ct[:, :, ::-1].copy() if left else ct


def _save(path, display: np.ndarray):
    """Store with an LPS affine: stored (i, j, k) = display (x, y, z)."""
    aff = np.diag([-SPACING[2], -SPACING[1], SPACING[0], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(display.transpose(2, 1, 0)), aff), str(path))
    return path


def _display(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)


@pytest.fixture
def post_checkpoint(tmp_path):
    from _doubles import ThresholdConfig, ThresholdNet, register_double

    from napari_genseg.models.checkpoints import save_checkpoint

    register_double()
    cfg = ThresholdConfig(img_size=32)
    return save_checkpoint(
        tmp_path / "post.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
        ["background", "soft", "dense"],
        {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "grid": "resize"},
        postprocess={"soft": {"single_component": True, "fill_holes": True, "side": "right"}})
