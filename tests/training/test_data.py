import numpy as np
import pytest
import torch

from napari_genseg.preprocessing import Normalization, SliceGrid
from napari_genseg.training import data as D
from napari_genseg.volume import Volume
from _tinynet import PHANTOM_SHAPE, PHANTOM_SPACING


def _fake_cases(n, source="pairs:x"):
    return [D.Case(name=f"case{i:02d}", volume=Volume(np.zeros((5, 8, 8), np.int16), (3.0, 1.0, 1.0)),
                   labels=np.zeros((5, 8, 8), np.uint8), source=source) for i in range(n)]


def test_split_is_deterministic_and_by_case():
    src = _fake_cases(10)
    c1, s1 = D.make_split([src], val_fraction=0.3, seed=7)
    c2, s2 = D.make_split([list(reversed(src))], val_fraction=0.3, seed=7)
    names = lambda cs, items: sorted(cs[i].name for i, _ in items)  # noqa: E731
    assert names(c1, s1.val) == names(c2, s2.val)  # order of the input does not matter
    assert len(s1.val) == 3 and len(s1.train) == 7
    assert not set(names(c1, s1.val)) & set(names(c1, s1.train))
    _, s3 = D.make_split([src], val_fraction=0.3, seed=8)
    assert names(c1, s3.val) != names(c1, s1.val)  # the seed chooses the cases


def test_slice_block_holdout_has_gap():
    train, val = D.slice_block_holdout(30, "auto", gap=2, size=8)
    assert val == list(range(11, 19))
    assert not set(train) & set(range(9, 21))
    assert len(train) == 30 - 8 - 4
    train, val = D.slice_block_holdout(30, "20:28", gap=2)
    assert val == list(range(20, 28)) and max(train) == 17 and 28 not in train and 29 not in train
    cases, split = D.make_split([_fake_cases(1)], holdout="1:3", holdout_gap=1)
    assert split.val == [(0, [1, 2])] and split.train == [(0, [4])]


def test_label_map():
    lab = np.array([[0, 1, 5, 7], [5, 5, 1, 2]])
    out = D.apply_label_map(lab, D.parse_label_map("5:1,1:2"), 3)
    assert out.tolist() == [[0, 2, 1, 0], [1, 1, 2, 0]]
    with pytest.raises(ValueError):
        D.apply_label_map(lab, {5: 4}, 3)


def test_phantom_source_and_grid():
    (cases,) = D.load_sources(["phantom:2@5"], class_names=["background", "liver", "spleen"],
                              phantom_shape=PHANTOM_SHAPE, phantom_spacing=PHANTOM_SPACING)
    assert [c.name for c in cases] == ["phantom_0005", "phantom_0006"]
    assert set(np.unique(cases[0].labels)) <= {0, 1, 2}
    grid = SliceGrid(48, "spacing", (4.0, 4.0))
    ds = D.SliceDataset(cases, [(0, [3, 4])], grid, Normalization(), augment=None)
    x, y = ds[0]
    assert x.shape == (1, 48, 48) and y.shape == (48, 48) and 0 <= float(x.min()) and float(x.max()) <= 1


def _liver_side(y):
    xs = torch.nonzero(y == 1)[:, 1].float()
    ss = torch.nonzero(y == 2)[:, 1].float()
    return float(xs.mean()), float(ss.mean())


def test_augmentation_never_flips_left_right():
    (cases,) = D.load_sources(["phantom:1"], phantom_shape=PHANTOM_SHAPE, phantom_spacing=PHANTOM_SPACING)
    grid = SliceGrid(64, "resize")
    aug = D.Augment(p_intensity=1, p_spatial=1, p_elastic=1, rotate_deg=15, scale=0.2)
    ds = D.SliceDataset(cases, [(0, [8, 9, 10, 11])], grid, Normalization(), augment=aug)
    assert not hasattr(aug, "flip_lr")
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x, y = ds[i]
            liver_x, spleen_x = _liver_side(y)
            assert liver_x < spleen_x  # liver stays on the patient's right = low x


def test_identity_augment_and_ap_flip():
    img = torch.arange(16.0).reshape(1, 4, 4) * 10
    lab = torch.zeros(4, 4, dtype=torch.long)
    lab[0, 0] = 1
    g = torch.Generator().manual_seed(0)
    aug = D.Augment(p_spatial=1, scale=0, rotate_deg=0, translate=0, p_elastic=0, flip_ap=1.0)
    x, y = aug.spatial(img, lab, g)
    assert torch.allclose(x[0], torch.flip(img[0], dims=[0]), atol=1e-3)  # rows (y) flipped only
    assert y[3, 0] == 1 and y[0, 0] == 0
    ident = D.Augment(p_spatial=1, scale=0, rotate_deg=0, translate=0, p_elastic=0)
    x, y = ident.spatial(img, lab, g)
    assert torch.allclose(x, img, atol=1e-3) and torch.equal(y, lab)


def test_nifti_labels_must_share_the_image_grid(tmp_path):
    import nibabel as nib

    aff = np.diag([-2.0, -2.0, 3.0, 1.0])
    img = np.zeros((16, 12, 5), np.int16)  # NIfTI voxel order (x, y, z)
    img[3, 4, 2] = 500  # a marker voxel
    lab = np.zeros((16, 12, 5), np.uint8)
    lab[3, 4, 2] = 1
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "ct.nii.gz")
    # the same grid stored in the other x order (RAS vs LAS): the marker must still meet the image's
    flip = aff.copy()
    flip[0, 0], flip[0, 3] = 2.0, aff[0, 3] - 2.0 * 15
    nib.save(nib.Nifti1Image(lab[::-1].copy(), flip), tmp_path / "lab_flipped.nii.gz")
    (case,) = D.nifti_cases([(tmp_path / "ct.nii.gz", tmp_path / "lab_flipped.nii.gz")])
    assert np.argwhere(case.labels == 1).tolist() == np.argwhere(case.image == 500).tolist()
    assert case.volume.source_path.endswith("ct.nii.gz")
    # a label file 6 mm (two slices) off is resampled onto the image's voxels with a warning: the
    # marker lands where it is in the world, not at its stored index
    moved = aff.copy()
    moved[2, 3] += 6.0
    nib.save(nib.Nifti1Image(lab, moved), tmp_path / "lab_moved.nii.gz")
    with pytest.warns(UserWarning, match="6.0 mm"):
        (case,) = D.nifti_cases([(tmp_path / "ct.nii.gz", tmp_path / "lab_moved.nii.gz")])
    (marker,) = np.argwhere(case.image == 500).tolist()
    assert np.argwhere(case.labels == 1).tolist() == [[marker[0] + 2, marker[1], marker[2]]]
