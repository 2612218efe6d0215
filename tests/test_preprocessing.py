"""Slice grids: one grid-mode concept in checkpoints, and the same field of view at another size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_genseg.models.arseg import CONFIGS
from napari_genseg.preprocessing import SliceGrid


def test_grid_meta_round_trip_and_version1_key():
    g = SliceGrid.create(256, "spacing", 1.5)
    assert g.to_meta() == {"grid": "spacing", "spacing_mm": [1.5, 1.5]}
    assert SliceGrid.from_meta(g.to_meta(), 256) == g
    # version-1 checkpoints call the mode "resize"
    assert SliceGrid.from_meta({"resize": "spacing", "spacing_mm": [1.5, 1.5]}, 256) == g
    assert SliceGrid.from_meta({"grid": "spacing", "spacing_mm": [1.5, 1.5]}, 256, mode="resize").mode == "resize"
    assert SliceGrid.from_meta({}, 64) == SliceGrid(64, "resize")
    assert SliceGrid.create(256, "spacing").target_spacing == (1.5, 1.5)  # 384 mm field of view
    with pytest.raises(ValueError, match="grid mode"):
        SliceGrid(64, "crop")


def _marker_centre(img: torch.Tensor) -> np.ndarray:
    """(row, col) centre of mass of a (1, 1, S, S) map, as a fraction of the side."""
    a = img[0, 0].double()
    ys, xs = torch.meshgrid(torch.arange(a.shape[0]) + 0.5, torch.arange(a.shape[1]) + 0.5, indexing="ij")
    return np.array([float((a * ys).sum() / a.sum()) / a.shape[0], float((a * xs).sum() / a.sum()) / a.shape[1]])


@pytest.mark.parametrize("mode", ["spacing", "resize"])
def test_mask_grid_covers_the_image_grids_field_of_view(mode):
    """AR-Seg paper sizes (image 1024², mask 128²): a marker lands at the same place of both grids,
    and the mask grid maps it back onto the marker's own pixels."""
    cfg = CONFIGS["arseg_paper"]
    img_grid = SliceGrid.create(cfg.img_size, mode, 0.4)  # 410 mm field of view
    mask_grid = img_grid.with_size(cfg.mask_size)
    assert mask_grid.size == 128
    if mode == "spacing":
        assert mask_grid.target_spacing == pytest.approx((3.2, 3.2))
    hw, spacing = (300, 340), (0.9, 0.8)  # an off-centre marker on a non-square slice
    x = torch.zeros(1, 1, *hw)
    x[..., 40:60, 250:280] = 1.0
    on_img = img_grid.to_model(x, spacing, pad_value=0.0)
    on_mask = mask_grid.to_model(x, spacing, pad_value=0.0)
    np.testing.assert_allclose(_marker_centre(on_img), _marker_centre(on_mask), atol=0.5 / 128)
    # back from the mask grid: the marker's pixels, not a shifted or scaled copy
    logit = (on_mask - 0.5) * 40.0
    back = mask_grid.from_model(logit, hw, spacing)[0, 0] > 0
    want = x[0, 0] > 0
    inter = (back & want).sum().item()
    assert 2 * inter / (back.sum().item() + want.sum().item()) > 0.8
    cy, cx = (torch.nonzero(back).float().mean(0) + 0.5).tolist()
    assert abs(cy - 50) <= 2 and abs(cx - 265) <= 2


def test_arseg_predictor_mask_grid_has_the_image_grids_field_of_view(tmp_path):
    """Spacing mode with mask size != image size (arseg_tiny: 64² image, 32² mask)."""
    from napari_genseg.predictors import make_predictor
    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import load_checkpoint, save_checkpoint

    entry = registry.get_entry("arseg_tiny")
    cfg = entry.config
    assert cfg.img_size != cfg.mask_size
    model = registry.get_family("arseg").build(cfg)
    grid = SliceGrid.create(cfg.img_size, "spacing", 3.0)
    path = save_checkpoint(tmp_path / "a.safetensors", model, "arseg", "arseg_tiny", cfg, ["background", "x"],
                           {"normalization": {"kind": "minmax"}, **grid.to_meta()})
    pred = make_predictor(load_checkpoint(path), device="cpu")
    fov_img = pred.grid.size * np.array(pred.grid.target_spacing)
    fov_mask = pred.mask_grid.size * np.array(pred.mask_grid.target_spacing)
    np.testing.assert_allclose(fov_mask, fov_img)


def test_spacing_crop_and_its_inverse_keep_marker_voxels():
    """A slice larger than the model grid at the grid's own spacing is centre-cropped: a marker
    inside the crop lands on the expected model pixel and maps back onto exactly its own voxel;
    a marker outside the crop is cut off and comes back as background."""
    g = SliceGrid(32, "spacing", (1.0, 1.0))
    hw = (100, 60)  # crop offsets: rows (100 - 32) // 2 = 34, columns (60 - 32) // 2 = 14
    x = torch.zeros(1, 1, *hw)
    x[0, 0, 40, 20] = 1.0  # inside the crop -> model pixel (6, 6)
    x[0, 0, 5, 30] = 1.0  # above the crop
    on = g.to_model(x, (1.0, 1.0), pad_value=0.0)
    assert on.shape == (1, 1, 32, 32)
    assert torch.nonzero(on[0, 0]).tolist() == [[6, 6]]
    # a two-class logit map that calls exactly the model pixels holding the marker foreground
    logits = torch.cat([1.0 - 2.0 * on, 2.0 * on - 1.0], 1) * 10.0
    back = g.from_model(logits, hw, (1.0, 1.0)).argmax(1)[0]
    assert back.shape == hw
    assert torch.nonzero(back).tolist() == [[40, 20]]
