"""Phantom -> Volume in one place (``Phantom.to_volume``), used by training cases and the UI sample;
geometry proven with marker voxels, not shapes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_genseg.io import load_volume, write_mask
from napari_genseg.phantom import make_phantom

SHAPE, SPACING = (10, 48, 56), (4.0, 3.0, 2.5)


@pytest.fixture(scope="module")
def ph():
    return make_phantom(seed=3, shape=SHAPE, spacing=SPACING)


def test_volume_is_the_phantom_read_back_from_nifti(ph, tmp_path):
    vol = ph.to_volume()
    p = tmp_path / "ph.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(ph.image, (2, 1, 0)), ph.affine), p)  # the NIfTI voxel order
    ref = load_volume(p)
    np.testing.assert_array_equal(vol.data, ph.image)
    np.testing.assert_array_equal(vol.data, ref.data)
    assert vol.spacing == ref.spacing == SPACING
    np.testing.assert_allclose(vol.origin, ref.origin)
    np.testing.assert_array_equal(vol.ornt, ref.ornt)
    np.testing.assert_array_equal(vol.source_affine, ph.affine)
    assert vol.source_shape == ref.source_shape and vol.meta["format"] == "phantom"


def test_marker_voxel_lands_at_its_world_position(ph, tmp_path):
    vol = ph.to_volume()
    z, y, x = 2, 5, 7
    mark = np.zeros(SHAPE, np.uint8)
    mark[z, y, x] = 9
    out = write_mask(tmp_path / "mark.nii.gz", mark, like=vol)
    img = nib.load(out)
    i, j, k = np.argwhere(np.asarray(img.dataobj) == 9)[0]
    ras = img.affine @ [i, j, k, 1.0]
    # LPS world of (z, y, x) from the Volume's origin and spacing: (S, P, L) -> RAS (-L, -P, S)
    s, p_, l_ = (np.asarray(vol.origin) + np.asarray([z, y, x]) * np.asarray(vol.spacing))
    np.testing.assert_allclose(ras[:3], [-l_, -p_, s], atol=1e-6)
    np.testing.assert_allclose(ras, ph.affine @ [x, y, z, 1.0], atol=1e-6)  # the phantom's own affine


def test_training_cases_carry_the_phantom_volume(ph):
    from napari_genseg.training import data as D

    (case,) = D.phantom_cases(1, seed0=3, class_names=["background", "liver", "spleen"], shape=SHAPE,
                              spacing=SPACING)
    vol = ph.to_volume()
    assert case.volume.spacing == vol.spacing and case.volume.origin == vol.origin
    np.testing.assert_array_equal(case.volume.source_affine, vol.source_affine)
    assert case.image is case.volume.data and case.spacing == SPACING
    np.testing.assert_array_equal(case.labels == 2, ph.labels == 2)  # spleen keeps its voxels


def test_ui_sample_uses_the_same_conversion(ph):
    pytest.importorskip("napari")
    from napari_genseg.ui._io import phantom_sample

    (img, ikw, _), (lab, lkw, _) = phantom_sample()
    vol = make_phantom(seed=0).to_volume()
    np.testing.assert_array_equal(img, vol.data)
    for kw in (ikw, lkw):
        assert tuple(kw["scale"]) == vol.spacing and tuple(kw["translate"]) == vol.origin
