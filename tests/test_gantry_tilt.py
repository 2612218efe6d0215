"""Gantry tilt (sheared slice grids): a marker voxel is on screen where it is in the patient, and a
mask written back lands on the source voxels with the exact sheared affine."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _dicom_series import Series, display_index_of, nifti_world_lps, tilted_iop, world_of_display

from napari_genseg.io import load_volume, read_nifti, write_mask

ROBUST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom-robustness"
TAN20 = float(np.tan(np.deg2rad(20)))

TILTED = {
    # Siemens-style: ImageOrientationPatient tilted, positions step along the table (z)
    "tilted_orientation_GantryDetectorTilt": dict(iop=tilted_iop(20), step=(0, 0, 2.5), gantry_tilt=20),
    # axial orientation, positions sheared along y, no tag: must still be found and warned
    "sheared_positions_axial": dict(step=(0, 2.5 * TAN20, 2.5)),
    # the same with GantryDetectorTilt set (the tag's sign convention is not used)
    "sheared_positions_GantryDetectorTilt": dict(step=(0, -2.5 * TAN20, 2.5), gantry_tilt=-20),
}


def _read(folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = load_volume(folder)
    return vol, [str(w.message) for w in caught]


@pytest.mark.parametrize("kind", list(TILTED))
def test_tilted_series_marker_within_one_voxel_on_screen_and_half_mm_in_written_mask(tmp_path, kind):
    s = Series(n=12, marker=(5, 18, 11), **TILTED[kind])  # marker on the last slice: largest shift
    s.write(tmp_path / "ct")
    vol, warned = _read(tmp_path / "ct")
    assert any("20.00 deg" in w for w in warned), warned
    if s.gantry_tilt is not None:
        assert any("GantryDetectorTilt" in w and "agrees" in w for w in warned), warned
    assert vol.resampled and vol.meta["sheared"]
    p = s.world(*s.marker)  # where the marker is in the patient (LPS mm)

    # on screen: napari places voxel (z, y, x) at translate + index * scale (mm, LPS)
    peak = np.unravel_index(int(np.argmax(vol.data)), vol.shape)
    err = np.abs(world_of_display(vol, peak) - p)
    spacing_lps = np.array(vol.spacing)[::-1]
    assert np.all(err <= spacing_lps), (err, spacing_lps)
    assert np.all(np.abs(display_index_of(vol, p) - np.array(peak)) <= 1.0)

    # the mask written back: the painted block lands on the marker's source voxel, whose world
    # position in the written NIfTI is the DICOM position
    lab = np.zeros(vol.shape, np.uint8)
    z, y, x = peak
    lab[max(z - 1, 0):z + 2, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = 1
    out = write_mask(tmp_path / "mask.nii.gz", lab, like=vol)
    img = nib.load(str(out))
    assert img.shape == (s.cols, s.rows, s.n)
    stored = np.asarray(img.dataobj)
    assert stored[s.marker] == 1
    assert np.linalg.norm(nifti_world_lps(img, s.marker) - p) < 0.5
    for ijk in np.argwhere(stored):  # nothing lands far from the marker
        assert np.linalg.norm(nifti_world_lps(img, ijk) - p) < 4 * max(vol.spacing)
    # sform = the exact sheared affine (slice k at its ImagePositionPatient); qform = rigid
    assert int(img.header["sform_code"]) > 0
    for k in (0, s.n - 1):
        np.testing.assert_allclose(nifti_world_lps(img, (0, 0, k)), s.position(k), atol=1e-3)
    q = img.header.get_qform()[:3, :3]
    qn = q / np.linalg.norm(q, axis=0)
    np.testing.assert_allclose(qn.T @ qn, np.eye(3), atol=1e-5)

    # and read back, the mask overlays the image on the same display grid
    back = read_nifti(out)
    assert back.shape == vol.shape  # same grid up to the float32 of the NIfTI header
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-4)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)
    assert back.data[peak] == 1


def test_gantry_tilt_tag_disagreeing_with_positions_is_reported(tmp_path):
    Series(n=6, gantry_tilt=15).write(tmp_path / "ct")
    vol, warned = _read(tmp_path / "ct")
    assert not vol.resampled
    assert any("GantryDetectorTilt" in w and "15 deg" in w and "differs" in w for w in warned), warned


def test_small_position_jitter_is_not_a_tilt(tmp_path):
    """Rounded positions (0.001 mm) must not trigger resampling."""
    s = Series(n=30, step=(0.0004, -0.0003, 1.25))
    s.write(tmp_path / "ct")
    vol, warned = _read(tmp_path / "ct")
    assert not vol.resampled and vol.shape == (30, s.rows, s.cols)
    assert not any("sheared" in w for w in warned)


def test_real_gantry_tilt_series_written_mask_keeps_sheared_geometry(tmp_path):
    folder = ROBUST / "dicom2nifti-failing" / "gantrytilting" / "001"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (needs ../shared/data/dicom-robustness)")
    import pydicom

    vol, warned = _read(folder)
    assert vol.resampled and any("14.00 deg" in w for w in warned), warned
    files = [Path(f) for f in vol.meta["files_in_order"]]
    ipp = [np.array([float(v) for v in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient])
           for f in files]
    # a ball of 20 mm radius painted on screen around a point inside the tilted slab (the pixels
    # of this test series are random noise, so only geometry can be compared)
    row, col = np.array([1.0, 0, 0]), np.array([0, 0.9703, -0.2419])
    ps = 0.41796875
    centre = ipp[1] + 300 * ps * row + 256 * ps * col
    kw = vol.layer_kwargs()  # napari world (S, P, L) = translate + index * scale
    s_, p_, l_ = (np.asarray(kw["translate"][a]) + np.arange(n) * kw["scale"][a] for a, n in enumerate(vol.shape))
    world = np.stack(np.broadcast_arrays(l_[None, None, :], p_[None, :, None], s_[:, None, None]), axis=-1)
    ball = (np.linalg.norm(world - centre, axis=-1) <= 20).astype(np.uint8)
    out = write_mask(tmp_path / "m.nii.gz", ball, like=vol)
    img = nib.load(str(out))
    assert img.shape == (512, 512, 4)
    for k, pos in enumerate(ipp):  # every source slice at its own ImagePositionPatient
        np.testing.assert_allclose(nifti_world_lps(img, (0, 0, k)), pos, atol=0.01)
        np.testing.assert_allclose(nifti_world_lps(img, (511, 511, k)) - pos, 511 * ps * (row + col), atol=0.05)
    # the written voxels are the source voxels inside the ball, by their DICOM geometry
    ii, jj = np.indices((512, 512))
    truth = np.stack([np.linalg.norm(pos + ii[..., None] * ps * row + jj[..., None] * ps * col - centre, axis=-1)
                      <= 20 for pos in ipp], axis=-1)
    mask = np.asarray(img.dataobj).astype(bool)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert truth.sum() > 1000 and dice > 0.97, dice


def test_rigidly_tilted_series_with_tag_is_an_oblique_volume(tmp_path):
    """Tilted planes with positions along their normal: no shear, the tag agrees with the planes."""
    t = np.deg2rad(20)
    s = Series(n=6, iop=tilted_iop(20), step=(0, 2.5 * np.sin(t), 2.5 * np.cos(t)), gantry_tilt=20)
    s.write(tmp_path / "ct")
    vol, warned = _read(tmp_path / "ct")
    assert not vol.resampled and vol.meta["oblique"] and vol.shape == (6, s.rows, s.cols)
    assert any("no shear" in w and "20.00 deg (agrees)" in w for w in warned), warned
