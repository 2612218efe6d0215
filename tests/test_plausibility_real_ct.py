"""What the user gets on the shipped real CT (issue #8 §9): the default model with its default 3-D
clean-up marks no liver or spleen in the pelvis (slices 0-40, hips to iliac crests), and still finds
both organs above it."""

import nibabel as nib
import numpy as np
import pytest


@pytest.mark.slow
def test_shipped_model_marks_no_liver_or_spleen_in_the_pelvis_of_the_real_ct(tmp_path):
    from napari_genseg.cli import main
    from napari_genseg.data import sample_ct_path
    from napari_genseg.io import load_volume

    out = tmp_path / "mask.nii.gz"
    assert main(["segment", str(sample_ct_path()), "--out", str(out), "--threads", "1", "--quiet"]) == 0
    mask = load_volume(out)  # display axes (z, y, x), z toward superior: slice 0 = hips
    lab = np.asarray(mask.data)
    assert lab.shape[0] == 112
    pelvis = lab[:41]
    assert int((pelvis == 1).sum()) == 0, "liver voxels in the pelvis"
    assert int((pelvis == 2).sum()) == 0, "spleen voxels in the pelvis"
    ml = float(np.prod(mask.spacing)) / 1000.0
    assert (lab == 1).sum() * ml > 600, "liver not found above the pelvis"
    assert (lab == 2).sum() * ml > 80, "spleen not found above the pelvis"
    # the display z axis runs inferior -> superior in the file as in the mask (same affine)
    np.testing.assert_allclose(nib.load(str(out)).affine, nib.load(str(sample_ct_path())).affine)
