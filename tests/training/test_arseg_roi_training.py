"""AR-Seg training in region-of-interest mode: crops of a fixed field of view in mm around each
lesion (jittered), negatives without it, and the field of view recorded in the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_genseg.training.data import phantom_cases
from napari_genseg.training.tasks.arseg_roi import ArSegRoiItems, roi_item_centres
from napari_genseg.preprocessing import Normalization

CLASSES = ["background", "liver_lesion"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


def test_item_centres_are_component_bounding_box_centres():
    m = np.zeros((20, 30), bool)
    m[2:5, 3:9] = True  # centre (3, 5.5)
    m[10:17, 20:21] = True  # centre (13, 20)
    assert roi_item_centres(m) == [(3.0, 5.5), (13.0, 20.0)]


def test_roi_items_are_centred_lesion_crops_at_the_field_of_view_in_mm():
    cases = phantom_cases(1, 3, CLASSES, shape=(16, 96, 96), spacing=(3.0, 2.0, 1.5))
    c = cases[0]
    ann = c.annotations["liver_lesion"]  # (4, Z, H, W)
    zs = list(range(c.n_slices))
    norm = Normalization.from_dict({"kind": "hu_window", "low": -125, "high": 275})
    ds = ArSegRoiItems(cases, [(0, zs)], CLASSES, img_size=64, mask_size=32, norm=norm, fov_mm=40.0,
                       jitter_mm=0.0, empty_fraction=0.5, seed=0, all_annotators=True)
    n_comp = sum(len(roi_item_centres(ann.any(0)[z])) for z in zs)
    assert n_comp > 0 and ds.n_pos == n_comp and ds.n_neg == int(round(0.5 * n_comp))
    assert len(ds) == 4 * (ds.n_pos + ds.n_neg)  # stage 1: every annotator is an item
    pos = [i for i, it in enumerate(ds.items) if it[-1] == 0][: ds.n_pos]
    for i in pos:
        ci, z, k, cy, cx, a = ds.items[i]
        crop = ds.crop(i)
        assert crop.pixel_mm == pytest.approx(40.0 / 64) and crop.center_yx == (cy, cx)
        x, y, cls = ds[i]
        assert x.shape == (1, 64, 64) and y.shape == (1, 32, 32) and cls == 0
        # the component the item was made for sits at the crop centre: a marker at the centre voxel
        # lands on the central mask pixels
        mk = np.zeros(ann.shape[2:], np.float32)
        mk[int(round(cy)), int(round(cx))] = 1.0
        mc = crop.with_size(32).from_slices(mk, pad_value=0.0)
        peak = np.unravel_index(np.argmax(mc), mc.shape)
        assert abs(peak[0] - 15.5) <= 2 and abs(peak[1] - 15.5) <= 2
    for i in [i for i, it in enumerate(ds.items) if it[-1] == 0][ds.n_pos:]:
        assert float(ds[i][1].sum()) == 0.0  # negatives: no lesion anywhere in the crop
    # jitter moves the centre by at most jitter_mm per axis, differently per epoch
    dj = ArSegRoiItems(cases, [(0, zs)], CLASSES, img_size=64, mask_size=32, norm=norm, fov_mm=40.0,
                       jitter_mm=6.0, empty_fraction=0.0, seed=0)
    g0, g1 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a, b = dj.crop(0, g0), dj.crop(0, g1)
    cy, cx = dj.items[0][3:5]
    for cr in (a, b):
        assert abs(cr.center_yx[0] - cy) * 2.0 <= 6.0 + 1e-9 and abs(cr.center_yx[1] - cx) * 1.5 <= 6.0 + 1e-9
    assert a.center_yx != b.center_yx


def test_roi_training_records_the_field_of_view_and_the_roi_predictor_uses_it(tmp_path):
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors.arseg_roi import ArSegRoiPredictor
    from napari_genseg.roi import RoiBox
    from napari_genseg.training.loop import train

    out = tmp_path / "roi.safetensors"
    train(dict(model="arseg_tiny", data=["phantom:2@3"], classes=CLASSES, phantom_shape=[10, 64, 64],
                   phantom_spacing=[3.0, 2.5, 2.5], batch_size=4, lr=2e-3, device="cpu", seed=0, quiet=True,
                   val_fraction=0.5, steps=3, threads=1, stage=1, roi_fov_mm=36.0, out=str(out)))
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["input"]["roi"]["fov_mm"] == 36.0 and meta["input"]["roi"]["jitter_mm"] == pytest.approx(6.0)
    assert meta["provenance"]["hyperparameters"]["roi_fov_mm"] == 36.0
    pred = ArSegRoiPredictor.from_checkpoint(load_checkpoint(out), device="cpu", n_samples=2)
    assert pred.fov_mm == 36.0
    res = pred.run(np.zeros((3, 40, 40), np.float32), (3.0, 2.5, 2.5), RoiBox(0, 1, 4, 14, 6, 12))
    assert res.votes.shape == (1, 10, 6)


def test_roi_items_equal_the_whole_volume_reference_and_keep_only_the_split_slices():
    """Items (positives, negatives drawn with the seed) equal those of the whole-volume recipe (n
    iterations of a 3x3 dilation of the class on every slice); the masks kept are the split's
    slices only (all slices were kept, per class); an item's crops are those of the whole slice."""
    from scipy import ndimage as ndi

    from napari_genseg.roi import RoiCrop
    from napari_genseg.training.tasks.arseg import target_masks
    from napari_genseg.training.tasks.arseg_roi import NEGATIVE_HU

    classes = ["background", "liver", "liver_lesion"]
    c = phantom_cases(1, 3, classes, shape=(12, 72, 60), spacing=(3.0, 0.6, 0.8))[0]
    zs = [9, 1, 4, 5]
    norm = Normalization.from_dict({"kind": "hu_window", "low": -125, "high": 275})
    fov, seed = 30.0, 3
    ds = ArSegRoiItems([c], [(0, zs)], classes, img_size=48, mask_size=24, norm=norm, fov_mm=fov,
                       empty_fraction=0.6, seed=seed, all_annotators=True)
    rng, ref = np.random.default_rng(seed), []
    n_iter = int(np.ceil(fov / 2 / 0.6)) + 1
    for k in (1, 2):
        m = target_masks(c, classes, k, slice(None))
        union = m.any(0)
        pos = [(z, cy, cx) for z in zs for cy, cx in roi_item_centres(union[z])]
        near = ndi.binary_dilation(union, structure=np.ones((1, 3, 3), bool), iterations=n_iter)
        cand = []
        for z in zs:
            yx = np.argwhere((c.image[z] >= NEGATIVE_HU[0]) & (c.image[z] <= NEGATIVE_HU[1]) & ~near[z])
            cand += [(z, float(p[0]), float(p[1])) for p in yx[rng.integers(len(yx), size=min(4, len(yx)))]]
        idx = rng.choice(len(cand), size=min(int(round(0.6 * len(pos))), len(cand)), replace=False)
        neg = [cand[int(i)] for i in sorted(idx)]
        ref += [(0, z, k, cy, cx, j) for z, cy, cx in pos + neg for j in range(m.shape[0])]
        assert ds.masks[(0, k)].shape[1] == len(zs)  # the split's slices, not all 12
    assert ds.n_neg > 0 and ds.items == ref
    for i in range(0, len(ds), 3):
        _, z, k, cy, cx, a = ds.items[i]
        crop = RoiCrop((cy, cx), (0.6, 0.8), fov, 48, fov)
        x, y, cls = ds[i]
        full = target_masks(c, classes, k, slice(None))[a, z].astype(np.float32)
        y_ref = torch.from_numpy(crop.from_slices(full[None], pad_value=0.0)[0] > 0.5).float()[None, None]
        y_ref = (torch.nn.functional.interpolate(y_ref, size=(24, 24), mode="area") > 0.5).float()[0]
        x_ref = norm(torch.from_numpy(crop.from_slices(c.image[z][None], pad_value=norm.pad_value_hu)))
        assert cls == k - 1 and torch.equal(y, y_ref) and torch.equal(x, x_ref.float())
