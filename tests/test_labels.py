"""Label files for evaluate/train (io/labels.py through training/data.nifti_cases): float ids are
rounded within 1e-3 or refused, never truncated; a label file on another grid is resampled onto
the image by the headers' geometry with a warning (marker voxel), or refused without overlap."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

from napari_genseg.io import VolumeReadError, read_nifti
from napari_genseg.training.data import nifti_cases

AFF = np.array([[1.0, 0, 0, -10.0], [0, 1.0, 0, -8.0], [0, 0, 1.0, -6.0], [0, 0, 0, 1]])
SHAPE = (20, 16, 12)  # (i, j, k)


def _image(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(40, 20, SHAPE).astype(np.int16)
    p = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(img, AFF), str(p))
    return p


def _labels(tmp_path, data, affine=AFF, name="lbl.nii.gz", slope=None):
    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    p = tmp_path / name
    nib.save(img, str(p))
    return p


def test_float_label_ids_are_refused_not_truncated(tmp_path):
    lab = np.zeros(SHAPE, np.float32)
    lab[2:6, 2:6, 2:6] = 0.988
    lab[8:12, 8:12, 6:9] = 1.976
    lp = _labels(tmp_path, lab)
    # the pairs used by `genseg evaluate` and `genseg train`
    with pytest.raises(VolumeReadError, match="0.988"):
        nifti_cases([(str(_image(tmp_path)), str(lp))], class_names=("background", "a", "b"))
    from napari_genseg.io.labels import read_label_file

    with pytest.raises(VolumeReadError, match=r"label ids must be integers; found 0\.988, 1\.976"):
        read_label_file(lp)


def test_scl_slope_scaled_ids_name_the_header(tmp_path):
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:6, 2:6, 2:6] = 1
    lab[8:12, 8:12, 6:9] = 2
    lp = _labels(tmp_path, lab, slope=0.988)
    from napari_genseg.io.labels import read_label_file

    with pytest.raises(VolumeReadError, match="scl_slope 0.988"):
        read_label_file(lp)


def test_ids_within_tolerance_are_rounded(tmp_path):
    lab = np.zeros(SHAPE, np.float32)
    lab[2:6, 2:6, 2:6] = 0.9996
    lab[8:12, 8:12, 6:9] = 2.0004
    cases = nifti_cases([(str(_image(tmp_path)), str(_labels(tmp_path, lab)))],
                        class_names=("background", "a", "b"))
    got = cases[0].labels
    assert got.dtype == np.uint8
    assert (got == 1).sum() == 4 * 4 * 4 and (got == 2).sum() == 4 * 4 * 3


def test_shifted_label_file_is_resampled_onto_the_image_with_a_warning(tmp_path):
    """A label file whose header puts it 7 mm higher (S) than the image: the marker voxel lands on
    the image voxel at its world position (not on the same array index), with one warning."""
    lab = np.zeros(SHAPE, np.uint8)
    marker_ijk = (5, 6, 2)
    lab[marker_ijk] = 2
    shifted = AFF.copy()
    shifted[2, 3] += 7.0
    lp = _labels(tmp_path, lab, shifted)
    ip = _image(tmp_path)
    with pytest.warns(UserWarning, match=r"another grid than the image \(voxel \(0, 0, 0\) 7\.0 mm apart"):
        cases = nifti_cases([(str(ip), str(lp))], class_names=("background", "a", "b"))
    got = cases[0].labels
    assert (got == 2).sum() == 1
    from napari_genseg.io.labels import world_affine

    z, y, x = np.argwhere(got == 2)[0]
    world_got = world_affine(read_nifti(ip)) @ np.array([x, y, z, 1.0])
    world_want = shifted @ np.array([*marker_ijk, 1.0])
    np.testing.assert_allclose(world_got[:3], world_want[:3], atol=0.5)
    assert "7.0 mm apart" in cases[0].meta["label_warnings"][0]


def test_same_grid_in_another_stored_orientation_needs_no_resampling(tmp_path):
    """The same world grid stored flipped (LAS instead of RAS) is the same grid: no warning."""
    from napari_genseg.io.labels import labels_for_image, world_affine

    lab = np.zeros(SHAPE, np.uint8)
    lab[3, 4, 5] = 1
    flip = AFF.copy()
    flip[0, 0] = -1.0
    flip[0, 3] = AFF[0, 3] + (SHAPE[0] - 1)
    lp = _labels(tmp_path, lab[::-1].copy(), flip)
    image = read_nifti(_image(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, notes = labels_for_image(image, lp)
    assert notes == []
    z, y, x = np.argwhere(got == 1)[0]
    np.testing.assert_allclose((world_affine(image) @ [x, y, z, 1.0])[:3], (AFF @ [3, 4, 5, 1.0])[:3])


def test_label_file_without_overlap_is_refused(tmp_path):
    from napari_genseg.io.labels import labels_for_image

    far = AFF.copy()
    far[2, 3] += 500.0
    lp = _labels(tmp_path, np.ones(SHAPE, np.uint8), far)
    with pytest.raises(VolumeReadError, match="does not overlap the image"):
        labels_for_image(read_nifti(_image(tmp_path)), lp)


def test_negative_and_nan_ids_are_refused(tmp_path):
    from napari_genseg.io.labels import read_label_file

    lab = np.zeros(SHAPE, np.int16)
    lab[0, 0, 0] = -1
    with pytest.raises(VolumeReadError, match="negative label id"):
        read_label_file(_labels(tmp_path, lab))
    lab = np.zeros(SHAPE, np.float32)
    lab[0, 0, 0] = np.nan
    with pytest.raises(VolumeReadError, match="NaN"):
        read_label_file(_labels(tmp_path, lab, name="nan.nii.gz"))


def test_real_reference_labels_pass_unchanged(shared_data):
    from napari_genseg.io.labels import labels_for_image

    img_p = shared_data / "ct-abdomen" / "ct_abdomen_small.nii.gz"
    lbl_p = shared_data / "ct-abdomen" / "ct_abdomen_small_labels.nii.gz"
    image = read_nifti(img_p)
    got, notes = labels_for_image(image, lbl_p)
    assert notes == []
    np.testing.assert_array_equal(got, read_nifti(lbl_p).data)


def test_evaluate_refuses_float_label_file(tmp_path, double_checkpoint):
    from napari_genseg.training.evaluate import evaluate

    lab = np.zeros(SHAPE, np.float32)
    lab[2:6, 2:6, 2:6] = 0.988
    spec = f"pairs:{_image(tmp_path)},{_labels(tmp_path, lab)}"
    with pytest.raises(VolumeReadError, match="label ids must be integers"):
        evaluate(double_checkpoint, spec)
