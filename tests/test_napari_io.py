"""npe2 reader / writer / sample data inside a real viewer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.gui


def test_open_nifti_and_save_painted_labels_on_source_geometry(make_napari_viewer_proxy, abdomen_ct, tmp_path):
    viewer = make_napari_viewer_proxy()
    [img] = viewer.open(str(abdomen_ct), plugin="napari-genseg")
    assert img.data.shape == (30, 101, 122)
    np.testing.assert_allclose(img.scale, (3.0, 3.0, 3.0))
    assert tuple(img.contrast_limits) == (-160.0, 240.0)
    assert "genseg_geometry" in img.metadata
    np.testing.assert_array_equal(img.metadata["genseg_geometry"]["source_affine"], nib.load(str(abdomen_ct)).affine)
    lab = viewer.add_labels(np.zeros(img.data.shape, np.uint8), scale=img.scale, translate=img.translate,
                            metadata=dict(img.metadata), name="mask")
    lab.data[10, 20:30, 40:50] = 3
    out = tmp_path / "painted.nii.gz"
    lab.save(str(out), plugin="napari-genseg")
    m = nib.load(str(out))
    np.testing.assert_array_equal(m.affine, nib.load(str(abdomen_ct)).affine)
    # painted voxels land on the same world positions: read back through the reader
    [back] = viewer.open(str(out), plugin="napari-genseg")
    np.testing.assert_array_equal(back.data, lab.data)


def test_open_dicom_folder(make_napari_viewer_proxy, shared_data):
    viewer = make_napari_viewer_proxy()
    [img] = viewer.open(str(shared_data / "dicom-ct-head"), plugin="napari-genseg")
    assert img.data.shape == (93, 64, 64)
    np.testing.assert_allclose(img.scale, (1.5, 3.2, 3.2))


def test_writer_refuses_source(make_napari_viewer_proxy, abdomen_ct, tmp_path):
    import shutil

    src = tmp_path / "ct.nii.gz"
    shutil.copy(abdomen_ct, src)
    before = src.read_bytes()
    viewer = make_napari_viewer_proxy()
    [img] = viewer.open(str(src), plugin="napari-genseg")
    lab = viewer.add_labels(np.zeros(img.data.shape, np.uint8), metadata=dict(img.metadata))
    with pytest.raises(Exception, match="refusing to overwrite"):
        lab.save(str(src), plugin="napari-genseg")
    assert src.read_bytes() == before


def test_phantom_sample(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    layers = viewer.open_sample("napari-genseg", "phantom")
    names = [l.name for l in viewer.layers]
    assert names == ["phantom CT", "phantom reference"]
    ref = viewer.layers["phantom reference"]
    assert ref.data.max() >= 2 and "liver" in list(ref.features["class"])
