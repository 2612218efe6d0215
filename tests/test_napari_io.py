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


def test_tilted_series_marker_on_screen_and_painted_mask_lands_on_source(make_napari_viewer_proxy, tmp_path):
    """A 20° gantry-tilted series (GantryDetectorTilt set): napari's world position of the marker is
    within one voxel of its DICOM position; a label painted there and saved through the plugin's
    writer lands on the marker's source voxel, whose world position in the NIfTI is the DICOM one."""
    from _dicom_series import Series, nifti_world_lps, tilted_iop

    s = Series(n=12, marker=(5, 18, 11), iop=tilted_iop(20), step=(0, 0, 2.5), gantry_tilt=20,
               name="IM{k:06d}")  # extension-less names too
    s.write(tmp_path / "ct")
    p = s.world(*s.marker)
    viewer = make_napari_viewer_proxy()
    # plugin=None: napari picks the reader by the manifest patterns, as on drag and drop
    [img] = viewer.open(str(tmp_path / "ct" / "IM000003"), plugin=None)  # one file: its series
    peak = np.unravel_index(int(np.argmax(img.data)), img.data.shape)
    world = np.asarray(img.data_to_world(peak))  # napari world = (S, P, L) mm
    assert np.all(np.abs(world[::-1] - p) <= np.asarray(img.scale)[::-1])
    lab = viewer.add_labels(np.zeros(img.data.shape, np.uint8), scale=img.scale, translate=img.translate,
                            metadata=dict(img.metadata), name="mask")
    z, y, x = peak
    lab.data[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2] = 2
    out = tmp_path / "painted.nii.gz"
    lab.save(str(out), plugin="napari-genseg")
    m = nib.load(str(out))
    assert m.shape == (s.cols, s.rows, s.n) and np.asarray(m.dataobj)[s.marker] == 2
    assert np.linalg.norm(nifti_world_lps(m, s.marker) - p) < 0.5
