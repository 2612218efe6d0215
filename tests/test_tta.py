"""Test-time augmentation: named views, exact inverse (marker voxels), reuse of the grid tensor,
the uncertainty definition shared with AR-Seg, and a tiny real model end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_genseg.engine import run_to_end, run_volume
from napari_genseg.models.checkpoints import load_checkpoint
from napari_genseg.predictors import SegmentationPredictor, make_predictor
from napari_genseg.predictors.base import PredictorOptionError
from napari_genseg.predictors.tta import TTA_VIEWS, TTAPredictor, View, tta_views, unwarp, warp
from napari_genseg.predictors.uncertainty import class_vote_disagreement, disagreement_percent, slice_scores
from napari_genseg.volume import Volume

torch.set_num_threads(1)


def _centroid(img: np.ndarray) -> np.ndarray:
    w = np.clip(img, 0, None)
    yy, xx = np.indices(w.shape)
    return np.array([(w * yy).sum(), (w * xx).sum()]) / w.sum()


def test_view_set_is_named_mixed_and_has_no_flip():
    names = [v.name for v in TTA_VIEWS]
    assert len(set(names)) == len(names) == 8
    assert all(v.scale > 0 for v in TTA_VIEWS)  # a negative scale would be a flip
    first4 = tta_views(4)
    assert any(v.shift != (0.0, 0.0) for v in first4)
    assert any(v.scale != 1.0 for v in first4)
    assert any(v.hu_offset != 0.0 for v in first4)
    with pytest.raises(PredictorOptionError):
        tta_views(9)
    with pytest.raises(ValueError):
        View("mirror", scale=-1.0)


@pytest.mark.parametrize("view", [v for v in TTA_VIEWS if v.geometric], ids=lambda v: v.name)
def test_marker_goes_where_the_view_says_and_comes_back(view):
    size = 64
    y0, x0 = 21, 40  # off-centre, so zoom and shift both move it
    img = torch.zeros(1, 1, size, size)
    img[0, 0, y0 - 1 : y0 + 2, x0 - 1 : x0 + 2] = 0.5  # a 3x3 marker peaked at its centre
    img[0, 0, y0, x0] = 1.0
    aug = warp(img, view)[0, 0].numpy()
    c = (size - 1) / 2.0
    expect = c + view.scale * (np.array([y0, x0]) - c) + np.array(view.shift)
    np.testing.assert_allclose(_centroid(aug), expect, atol=0.25)
    back = unwarp(warp(img, view), view)[0, 0].numpy()
    np.testing.assert_allclose(_centroid(back), [y0, x0], atol=0.25)
    assert np.unravel_index(back.argmax(), back.shape) == (y0, x0)
    if view.scale == 1.0:  # integer shifts are exact
        np.testing.assert_array_equal(back, img[0, 0].numpy())


def test_unwarp_falls_back_where_the_view_saw_nothing():
    y = torch.zeros(1, 2, 32, 32)
    fb = torch.full((1, 2, 32, 32), 7.0)
    out = unwarp(y, View("shift", shift=(3.0, 0.0)), fallback=fb)[0, 0]
    # content moved 3 rows down: the last 3 original rows left the view
    assert (out[-3:] == 7).all() and (out[:-3] == 0).all()


def _double_predictor(ckpt, views):
    return TTAPredictor.from_checkpoint(load_checkpoint(ckpt), device="cpu", views=views)


def test_tta_labels_are_the_plain_prediction_and_marker_votes_agree(double_checkpoint):
    data = np.full((3, 32, 32), -1000, np.int16)
    data[:, 4:28, 4:28] = 0  # soft tissue
    data[:, 9:12, 20:23] = 900  # a dense marker off-centre
    vol = Volume(data, spacing=(2.0, 1.0, 1.0))
    plain = run_to_end(run_volume(make_predictor(load_checkpoint(double_checkpoint), device="cpu"), vol))
    tta = run_to_end(run_volume(_double_predictor(double_checkpoint, 8), vol))
    np.testing.assert_array_equal(tta.labels, plain.labels)
    votes = np.stack([tta.extras["class_votes"][z] for z in range(3)])  # (Z, C, H, W)
    assert votes.shape == (3, 3, 32, 32)
    assert (votes.sum(1) == 8).all()
    assert (votes[:, 2, 10, 21] == 8).all()  # every view lands the marker back on its voxel
    dis = class_vote_disagreement(votes.transpose(1, 0, 2, 3), 8, tta.labels)
    assert dis[:, 10, 21].max() == 0 and dis[:, 16, 8].max() == 0 and dis[:, 0, 0].max() == 0
    assert dis.max() > 0  # edges move under shifts and scales


def test_hu_jitter_flips_a_voxel_near_a_band_edge(double_checkpoint):
    # the double: window -200..200 HU -> [0, 1], class = nearest of 0, 0.5, 1; -110 HU is 0.225
    # (background) and +25 HU makes it 0.2875 (soft): only the "HU +25" view disagrees
    data = np.full((1, 32, 32), -110, np.int16)
    vol = Volume(data, spacing=(1.0, 1.0, 1.0))
    views = (TTA_VIEWS[0], TTA_VIEWS[1], TTA_VIEWS[2])  # shift, scale, HU +25
    res = run_to_end(run_volume(_double_predictor(double_checkpoint, views), vol))
    votes = res.extras["class_votes"][0]
    dis = class_vote_disagreement(votes, 3, res.labels[0])
    assert res.labels[0, 16, 16] == 0
    assert dis[16, 16] == pytest.approx(100.0 / 3)


def test_views_reuse_the_grid_tensor_and_the_loaded_model(double_checkpoint, monkeypatch):
    from napari_genseg.preprocessing import SliceGrid

    pred = _double_predictor(double_checkpoint, 8)
    calls = {"to_model": 0, "forward": 0}
    orig_to_model = SliceGrid.to_model

    def counting_to_model(self, *a, **k):
        calls["to_model"] += 1
        return orig_to_model(self, *a, **k)

    monkeypatch.setattr(SliceGrid, "to_model", counting_to_model)
    pred.base.model.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    vol = Volume(np.zeros((4, 20, 24), np.int16), spacing=(1.0, 1.0, 1.0))
    run_to_end(run_volume(pred, vol, batch_size=4))
    assert calls == {"to_model": 1, "forward": 9}  # one resampling per batch, 1 + K forward passes


def test_class_vote_disagreement_is_ar_segs_definition_for_two_classes():
    rng = np.random.default_rng(0)
    n = 6
    v = rng.integers(0, n + 1, size=(5, 7))
    shown = rng.random((5, 7)) > 0.5
    cv = np.stack([n - v, v])
    np.testing.assert_allclose(class_vote_disagreement(cv, n, shown.astype(np.uint8)),
                               disagreement_percent(v, n, shown))
    # a label painted with an id the model does not know: everyone disagrees
    assert class_vote_disagreement(cv, n, np.full((5, 7), 4))[0, 0] == 100.0
    with pytest.raises(ValueError):
        class_vote_disagreement(cv, n, np.zeros((5, 6), int))


def test_slice_scores_by_hand():
    d = np.zeros((3, 4, 4), np.float32)
    shown = np.zeros((3, 4, 4), np.uint8)
    shown[0, :2, :2] = 1  # 4 voxels, all agreed on
    shown[1, :2, :2] = 1
    d[1, 0, 0] = 100.0  # one of 4 foreground voxels fully disputed
    d[1, 3, 3] = 50.0  # a background voxel half the views call foreground
    assert slice_scores(d, shown).tolist() == [0.0, pytest.approx(30.0), 0.0]
    assert slice_scores(d, shown, axis=2).shape == (4,)


def test_tiny_real_msa2net_tta_end_to_end(tmp_path):
    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import save_checkpoint

    entry = registry.get_entry("msa2net_tiny")
    torch.manual_seed(0)
    model = registry.get_family("msa2net").build(entry.config)
    ckpt_path = save_checkpoint(tmp_path / "m.safetensors", model, "msa2net", "msa2net_tiny", entry.config,
                                ["background", "organ"], {"normalization": {"kind": "hu_window"}, "grid": "resize"})
    ckpt = load_checkpoint(ckpt_path)
    rng = np.random.default_rng(1)
    vol = Volume(rng.integers(-300, 300, size=(2, 48, 40)).astype(np.int16), spacing=(2.0, 0.8, 0.8))
    plain = run_to_end(run_volume(SegmentationPredictor.from_checkpoint(ckpt, device="cpu"), vol))
    tta = run_to_end(run_volume(TTAPredictor.from_checkpoint(ckpt, device="cpu", views=2), vol))
    np.testing.assert_array_equal(tta.labels, plain.labels)
    votes = np.stack([tta.extras["class_votes"][z] for z in range(2)])
    assert votes.shape == (2, 2, 48, 40) and (votes.sum(1) == 2).all()
