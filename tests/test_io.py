"""NIfTI / DICOM reading with geometry, mask writing (atomic, source protected), bad input."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from napari_genseg.io import MaskWriteError, VolumeReadError, load_volume, read_nifti, write_mask


def _nifti(tmp_path, data, affine, name="ct.nii.gz"):
    p = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), str(p))
    return p


def test_real_ct_round_trip_identical_affine_and_voxels(abdomen_ct, tmp_path):
    vol = read_nifti(abdomen_ct)
    assert vol.shape == (30, 101, 122)
    assert vol.spacing == (3.0, 3.0, 3.0)
    out = write_mask(tmp_path / "mask.nii.gz", (vol.data > 100).astype(np.uint8), like=vol)
    src, back = nib.load(str(abdomen_ct)), nib.load(str(out))
    np.testing.assert_array_equal(back.affine, src.affine)
    assert back.header.get_qform(coded=True)[1] == src.header.get_qform(coded=True)[1]
    assert back.header.get_sform(coded=True)[1] == src.header.get_sform(coded=True)[1]
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(src.dataobj) > 100)
    vol2 = read_nifti(out)
    np.testing.assert_array_equal(vol2.data, (vol.data > 100))
    assert vol2.origin == vol.origin and vol2.spacing == vol.spacing


def test_reference_labels_written_back_overlay_exactly(shared_data, tmp_path):
    ct = shared_data / "ct-abdomen" / "ct_abdomen_small.nii.gz"
    lab = shared_data / "ct-abdomen" / "ct_abdomen_small_labels.nii.gz"
    vct, vlab = read_nifti(ct), read_nifti(lab)
    assert vct.shape == vlab.shape and vct.origin == vlab.origin and vct.spacing == vlab.spacing
    out = write_mask(tmp_path / "labels.nii.gz", vlab.data, like=vct)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), np.asarray(nib.load(str(lab)).dataobj))
    assert nib.load(str(out)).get_data_dtype() == np.uint8


def test_display_convention_liver_on_screen_left(shared_data):
    """Radiological view: patient's right (liver, id 5) at low x, spleen (id 1) at high x."""
    lab = read_nifti(shared_data / "ct-abdomen" / "ct_abdomen_small_labels.nii.gz").data
    liver_x = np.nonzero(lab == 5)[2].mean()
    spleen_x = np.nonzero(lab == 1)[2].mean()
    assert liver_x < spleen_x
    # anterior at the top: the spine (posterior) sits at larger y than the liver's front
    assert np.nonzero(lab == 5)[1].min() < lab.shape[1] / 2


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PIR"])
def test_reorientation_round_trip(tmp_path, codes):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, size=(7, 6, 5)).astype(np.int16)
    ornt = nib.orientations.axcodes2ornt(tuple(codes))
    aff = np.eye(4)
    for i, (ax, flip) in enumerate(ornt):
        aff[:, i] = 0
        aff[int(ax), i] = flip * (1.0 + 0.5 * i)
    aff[:3, 3] = (10, -20, 30)
    aff[3, 3] = 1
    p = _nifti(tmp_path, data, aff)
    vol = read_nifti(p)
    assert vol.orientation == codes
    # world position of every display voxel equals the source's
    disp_aff = vol.display_affine_ras
    src_idx = np.array([[1, 2, 3], [6, 0, 4]])
    for ijk in src_idx:
        world = aff @ np.r_[ijk, 1]
        xyz = np.linalg.solve(disp_aff, world)[:3].round().astype(int)
        assert vol.data[xyz[2], xyz[1], xyz[0]] == data[tuple(ijk)]
    out = write_mask(tmp_path / "m.nii", (vol.data > 0).astype(np.uint8), like=vol)
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(back.dataobj), data > 0)
    np.testing.assert_allclose(back.affine, aff)


def test_oblique_shown_on_closest_axes_and_affine_kept(tmp_path):
    th = np.deg2rad(12)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot * 2.0
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    vol = read_nifti(_nifti(tmp_path, data, aff))
    assert vol.meta["oblique"] and abs(vol.meta["obliquity_deg"] - 12) < 0.01
    np.testing.assert_allclose(vol.source_affine, aff, atol=1e-6)
    out = write_mask(tmp_path / "m.nii.gz", np.ones(vol.shape, np.uint8), like=vol)
    np.testing.assert_allclose(nib.load(str(out)).affine, aff, atol=1e-5)


def test_dicom_head_series_sorted_by_position_with_hu(shared_data):
    import pydicom

    folder = shared_data / "dicom-ct-head"
    vol = load_volume(folder)
    assert vol.shape[0] == 93
    assert vol.spacing == pytest.approx((1.5, 3.2, 3.2))
    files = vol.meta["files_in_order"]
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    assert z == sorted(z) and len(set(z)) == 93
    assert sorted(str(p.name) for p in folder.glob("*.dcm"))[:3] == ["CTHead1.dcm", "CTHead10.dcm", "CTHead11.dcm"]
    for k in (0, 46, 92):  # HU = raw * slope + intercept, in anatomical order
        ds = pydicom.dcmread(files[k])
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.data[k], hu)  # LPS: rows = y, cols = x as stored
    assert vol.meta["warnings"] == []


def test_dicom_missing_slice_warns_and_two_series_pick_largest(shared_data, tmp_path):
    import pydicom

    src = shared_data / "dicom-ct-head"
    gap = tmp_path / "gap"
    gap.mkdir()
    for f in src.glob("*.dcm"):
        if f.name != "CTHead40.dcm":
            shutil.copy(f, gap / f.name)
    with pytest.warns(UserWarning, match="missing"):
        vol = load_volume(gap)
    # the gap is kept as an empty slice, so every slice stays at its true position
    assert vol.shape[0] == 93 and vol.spacing[0] == pytest.approx(1.5)
    z40 = float(pydicom.dcmread(src / "CTHead40.dcm", stop_before_pixels=True).ImagePositionPatient[2])
    k40 = round((z40 - vol.origin[0]) / vol.spacing[0])
    assert np.ptp(vol.data[k40]) == 0 and np.ptp(vol.data[k40 + 1]) > 0
    z41 = pydicom.dcmread(src / "CTHead41.dcm")
    np.testing.assert_array_equal(
        vol.data[round((float(z41.ImagePositionPatient[2]) - vol.origin[0]) / 1.5)],
        z41.pixel_array * float(z41.RescaleSlope) + float(z41.RescaleIntercept))
    two = tmp_path / "two"
    two.mkdir()
    for i, f in enumerate(sorted(src.glob("*.dcm"))[:12]):
        ds = pydicom.dcmread(f)
        if i < 4:
            ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.save_as(two / f.name)
    with pytest.warns(UserWarning, match="2 series"):
        vol = load_volume(two)
    # CTHead2 and CTHead13..19 remain: 8 slices, the 10 between them kept as empty slices
    assert vol.meta["n_slices"] == 8 and vol.shape[0] == 18


def test_dicom_two_equal_series_refused(shared_data, tmp_path):
    import pydicom

    two = tmp_path / "two"
    two.mkdir()
    for i, f in enumerate(sorted((shared_data / "dicom-ct-head").glob("*.dcm"))[:8]):
        ds = pydicom.dcmread(f)
        if i % 2:
            ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.save_as(two / f.name)
    with pytest.raises(VolumeReadError, match="equal size"):
        load_volume(two)


def test_bad_inputs_have_clear_messages(tmp_path, abdomen_ct):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(VolumeReadError, match="no DICOM"):
        load_volume(tmp_path / "empty")
    with pytest.raises(VolumeReadError, match="no such"):
        load_volume(tmp_path / "missing.nii.gz")
    # truncated gzip
    raw = abdomen_ct.read_bytes()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeReadError, match="truncated|cannot read"):
        load_volume(trunc)
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"not a nifti at all" * 10)
    with pytest.raises(VolumeReadError):
        load_volume(junk)
    with pytest.raises(VolumeReadError, match="2-D"):
        load_volume(_nifti(tmp_path, np.zeros((5, 5), np.int16), np.eye(4), "flat.nii.gz"))
    with pytest.raises(VolumeReadError, match="4-D"):
        load_volume(_nifti(tmp_path, np.zeros((5, 5, 5, 3), np.int16), np.eye(4), "t.nii.gz"))
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(VolumeReadError, match="RGB"):
        load_volume(_nifti(tmp_path, rgb, np.eye(4), "rgb.nii.gz"))
    nan = np.zeros((4, 4, 4), np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.warns(UserWarning, match="NaN"):
        vol = load_volume(_nifti(tmp_path, nan, np.eye(4), "nan.nii.gz"))
    assert np.isfinite(vol.data).all() and vol.meta["nan_voxels"] == 1
    with pytest.raises(VolumeReadError, match="no finite"):
        load_volume(_nifti(tmp_path, np.full((3, 3, 3), np.nan, np.float32), np.eye(4), "allnan.nii.gz"))


def test_writer_refuses_source_and_is_atomic(abdomen_ct, tmp_path, monkeypatch):
    src = tmp_path / "ct.nii.gz"
    shutil.copy(abdomen_ct, src)
    before = src.read_bytes()
    vol = read_nifti(src)
    with pytest.raises(MaskWriteError, match="source"):
        write_mask(src, np.zeros(vol.shape, np.uint8), like=vol)
    assert src.read_bytes() == before
    out = tmp_path / "mask.nii.gz"
    write_mask(out, np.ones(vol.shape, np.uint8), like=vol)
    good = out.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(OSError):
        write_mask(out, np.zeros(vol.shape, np.uint8), like=vol)
    assert out.read_bytes() == good  # the old file survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "mask.json", "mask.nii.gz"]


def test_labels_dtype_and_no_metadata_geometry(tmp_path):
    lab = np.zeros((3, 4, 5), np.int32)
    lab[0, 0, 0] = 300
    out = write_mask(tmp_path / "a.nii.gz", lab, spacing=(2.0, 1.0, 0.5), origin=(10.0, 20.0, 30.0))
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint16
    vol = read_nifti(out)
    assert vol.spacing == (2.0, 1.0, 0.5) and vol.origin == (10.0, 20.0, 30.0)
    np.testing.assert_array_equal(vol.data, lab)
    with pytest.raises(MaskWriteError):
        write_mask(tmp_path / "b.png", lab)


def test_outputs_get_normal_file_permissions(tmp_path):
    import os
    import stat

    out = write_mask(tmp_path / "m.nii.gz", np.zeros((2, 3, 4), np.uint8))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
