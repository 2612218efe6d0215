"""DICOM kinds that break readers: Enhanced CT, compressed transfer syntaxes, slices without a
position, a localizer inside the series, mixed orientations, PixelPaddingValue, stacked slices,
missing slices. Real files from ../shared/data/dicom-robustness; the rest built with pydicom."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _dicom_series import Series, nifti_world_lps, world_of_display

from napari_genseg.io import VolumeReadError, load_volume, write_mask

ROBUST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom-robustness"


def _robust(*parts) -> Path:
    p = ROBUST.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not found (needs ../shared/data/dicom-robustness)")
    return p


def _read(path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = load_volume(path, **kw)
    return vol, [str(w.message) for w in caught]


def max_diff_to_ground_truth(vol, gt_path: Path) -> float:
    """Compare every voxel of a reference NIfTI with the volume at the same world position.

    The reference's voxel grid must map onto the volume's display grid exactly (integer indices:
    same positions, whatever the axis order or flips of the LAS/RAS conventions); returns the
    largest |difference| of voxel values.
    """
    gt = nib.load(str(gt_path))
    ref = np.asarray(gt.dataobj)
    ijk = np.indices(ref.shape).reshape(3, -1)
    ras = gt.affine[:3, :3] @ ijk + gt.affine[:3, 3:4]
    disp = np.linalg.inv(vol.display_affine_ras)
    xyz = disp[:3, :3] @ ras + disp[:3, 3:4]
    idx = np.rint(xyz).astype(int)
    assert np.abs(xyz - idx).max() < 1e-2, "the reference grid does not fall on the volume's voxels"
    for a, n in zip(idx, (vol.shape[2], vol.shape[1], vol.shape[0])):
        assert a.min() >= 0 and a.max() < n
    mine = vol.data[idx[2], idx[1], idx[0]]
    assert ref.size == vol.data.size  # every voxel of the volume is compared
    return float(np.abs(mine.astype(np.float64) - ref.reshape(-1).astype(np.float64)).max())


# ------------------------------------------------------------------------- Enhanced CT (item 3)
def test_enhanced_ct_reads_two_frames_with_functional_group_geometry():
    import pydicom

    path = _robust("enhanced-ct", "eCT_Supplemental.dcm")
    vol, warned = _read(path)
    ds = pydicom.dcmread(path)
    assert vol.shape == (2, 512, 512)
    assert vol.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    frames = ds.pixel_array
    for f in range(2):
        pos = [float(v) for v in ds.PerFrameFunctionalGroupsSequence[f].PlanePositionSequence[0].ImagePositionPatient]
        # the first transmitted pixel of frame f; rows run along (-1, 0, 0): the display flips x
        z = int(round((pos[2] - vol.origin[0]) / vol.spacing[0]))
        np.testing.assert_allclose(world_of_display(vol, (z, 0, 511)), pos, atol=1e-3)
        np.testing.assert_array_equal(vol.data[z], frames[f][:, ::-1].astype(np.int32) - 1024)
    assert vol.meta["n_slices"] == 2


def test_enhanced_ct_per_frame_groups_override_shared(tmp_path):
    """Orientation, pixel measures and rescale moved into the Per-frame groups, frames out of order."""
    import copy

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(_robust("enhanced-ct", "eCT_Supplemental.dcm"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    for f, per in enumerate(ds.PerFrameFunctionalGroupsSequence):
        per.PlaneOrientationSequence = copy.deepcopy(shared.PlaneOrientationSequence)
        per.PixelMeasuresSequence = copy.deepcopy(shared.PixelMeasuresSequence)
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = "2", str(-1000 - f), "HU"
        per.PixelValueTransformationSequence = Sequence([pvt])
    for name in ("PlaneOrientationSequence", "PixelMeasuresSequence", "PixelValueTransformationSequence"):
        delattr(shared, name)
    ds.save_as(tmp_path / "enhanced")  # extension-less name as well
    vol, _ = _read(tmp_path / "enhanced")
    frames = ds.pixel_array
    for f in range(2):
        pos = [float(v) for v in ds.PerFrameFunctionalGroupsSequence[f].PlanePositionSequence[0].ImagePositionPatient]
        z = int(round((pos[2] - vol.origin[0]) / vol.spacing[0]))
        np.testing.assert_array_equal(vol.data[z], frames[f][:, ::-1].astype(np.int32) * 2 - 1000 - f)


# --------------------------------------------------------------- compressed syntaxes (item 4)
COMPRESSED = ["compressed", "compressed_j2k", "compressed_jpeg", "compressed_jpegls", "compressed_rle"]


@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_series_decode_to_ground_truth_voxels(name):
    folder = _robust("dicom2nifti-compressed", name, "001")
    vol, warned = _read(folder)
    assert any("not CT" in w for w in warned)  # an MR series: read with a warning
    assert max_diff_to_ground_truth(vol, folder.parent / "001_ground_truth.nii.gz") == 0
    assert max_diff_to_ground_truth(vol, folder.parent / "001_ground_truth_reoriented.nii.gz") == 0


def test_missing_decoder_is_one_line_naming_the_package(monkeypatch):
    import pydicom
    from pydicom.uid import JPEGLSLossless

    folder = _robust("dicom2nifti-compressed", "compressed_jpegls", "001")
    decoder = pydicom.pixels.get_decoder(JPEGLSLossless)
    monkeypatch.setattr(decoder, "_available", {})
    with pytest.raises(VolumeReadError) as info:
        load_volume(folder)
    msg = str(info.value)
    assert "\n" not in msg and "pip install python-gdcm" in msg and "JPEG-LS" in msg


def test_slicecount_two_slice_series_matches_ground_truth():
    folder = _robust("dicom2nifti-failing", "slicecount", "001")
    vol, _ = _read(folder)
    assert vol.shape == (256, 256, 2)
    assert max_diff_to_ground_truth(vol, folder.parent / "001_ground_truth.nii.gz") == 0


# ---------------------------------------------------------------------------- item 5 kinds
@pytest.mark.parametrize("attr,reported", [("ImagePositionPatient", "1 of 8 slices without ImagePositionPatient"),
                                           ("PixelSpacing", "1 of 8 slices without a valid PixelSpacing")])
def test_slices_without_position_are_listed(tmp_path, attr, reported):
    s = Series(n=8)
    paths = s.write(tmp_path / "ct")
    import pydicom

    ds = pydicom.dcmread(paths[3])
    delattr(ds, attr)
    ds.save_as(paths[3])
    vol, warned = _read(tmp_path / "ct")
    assert vol.meta["n_slices"] == 7
    assert any(reported in w and paths[3].name in w for w in warned), warned
    assert vol.shape[0] == 8  # the skipped slice's place is kept (empty), the others keep their positions


@pytest.mark.parametrize("odd", ["localizer", "other_orientation"])
def test_localizer_inside_axial_series_is_dropped_with_report(tmp_path, odd):
    s = Series(n=20, marker=(6, 7, 9))
    s.write(tmp_path / "ct")
    # one odd image filed under the same series UID, named to sort first
    loc = Series(n=1, rows=30, cols=30, iop=(1, 0, 0, 0, 0, -1), series_uid=s.series_uid,
                 sop_root="1.2.826.0.1.3680043.9.7.9", name="A_odd.dcm", extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
                 if odd == "localizer" else {})
    loc.write(tmp_path / "ct")
    vol, warned = _read(tmp_path / "ct")
    assert vol.shape == (20, s.rows, s.cols)
    assert any("dropped 1 of 21 slices" in w and "A_odd.dcm" in w for w in warned), warned
    peak = np.unravel_index(int(np.argmax(vol.data)), vol.shape)
    np.testing.assert_allclose(world_of_display(vol, peak), s.world(*s.marker), atol=1e-4)


def test_series_splitting_into_comparable_groups_is_refused(tmp_path):
    s = Series(n=6)
    s.write(tmp_path / "ct")
    Series(n=6, iop=(1, 0, 0, 0, 0, -1), step=(0, 2.0, 0), series_uid=s.series_uid, name="COR{k:02d}.dcm",
           sop_root="1.2.826.0.1.3680043.9.7.9").write(tmp_path / "ct")
    with pytest.raises(VolumeReadError, match=r"not one volume.*6 slices.*\+ 6 slices"):
        load_volume(tmp_path / "ct")
    real = _robust("dicom2nifti-failing", "sliceorientation", "001")
    with pytest.raises(VolumeReadError, match=r"not one volume.*2 slices.*\+ 2 slices") as info:
        load_volume(real)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("pad,limit,stored_hu", [(-2000, None, -3024), (-2000, -1500, -2600),
                                                  (63536, None, -3024)])
def test_pixel_padding_value_becomes_air(tmp_path, pad, limit, stored_hu):
    import pydicom

    s = Series(n=4)
    paths = s.write(tmp_path / "ct")
    for p in paths:
        ds = pydicom.dcmread(p)
        arr = ds.pixel_array.copy()
        arr[:, :2] = stored_hu + 1024  # the padded frame outside the scan field
        ds.PixelData = arr.astype(np.int16).tobytes()
        # 63536 is -2000 written as US (PixelPaddingValue is US or SS, PS3.3 C.7.5.1.1.2)
        ds.add_new((0x0028, 0x0120), "US" if pad > 32767 else "SS", pad)
        if limit is not None:
            ds.add_new((0x0028, 0x0121), "SS", limit)
        ds.save_as(p)
    vol, warned = _read(tmp_path / "ct")
    assert vol.data.min() == -1024
    # the padded columns (i = 0, 1) are display x = 0, 1 (rows run along +x = L)
    assert np.all(vol.data[:, :, :2] == -1024)
    assert any("PixelPaddingValue" in w for w in warned)


def test_real_ge_ct_padding_is_air_and_seg_object_skipped():
    vol, warned = _read(_robust("ge-ct-3slice-liver"))
    assert vol.shape == (3, 512, 512) and vol.data.min() == -1024
    assert any("Segmentation" in w for w in warned) and any("PixelPaddingValue" in w for w in warned)


def test_real_stacked_slices_refused_clearly():
    with pytest.raises(VolumeReadError, match="not one volume: 4 slices share a position") as info:
        load_volume(_robust("dicom2nifti-failing", "notavolume", "001"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["001", "002"])
def test_real_missing_slice_warns_and_mask_lands_on_the_right_slices(tmp_path, case):
    import pydicom

    folder = _robust("dicom2nifti-failing", "sliceincrement", case)
    vol, warned = _read(folder)
    assert any("1 slice(s) missing" in w for w in warned), warned
    assert vol.meta["n_slots"] == 5 and vol.meta["n_slices"] == 4
    files = sorted(folder.iterdir())
    # label every display voxel with the number of the DICOM file whose slice plane it is on
    inv = np.linalg.inv(vol.source_affine)
    kw = vol.layer_kwargs()
    s_, p_, l_ = (np.asarray(kw["translate"][a]) + np.arange(n) * kw["scale"][a] for a, n in enumerate(vol.shape))
    lps = np.stack(np.broadcast_arrays(l_[None, None, :], p_[None, :, None], s_[:, None, None]), axis=-1)
    ras = lps * np.array([-1.0, -1.0, 1.0])
    k_cont = ras @ inv[2, :3] + inv[2, 3]  # the source slice coordinate of every display voxel
    slot_of_file = {}
    for n, f in enumerate(files, start=1):
        ipp = np.array([float(v) for v in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient])
        k = (inv @ np.r_[ipp * np.array([-1, -1, 1.0]), 1])[2]
        slot_of_file[n] = (f, int(round(k)))
    labels = np.zeros(vol.shape, np.uint8)
    for n, (_, k) in slot_of_file.items():
        labels[np.abs(k_cont - k) < 0.5] = n
    out = write_mask(tmp_path / "m.nii.gz", labels, like=vol)
    img = nib.load(str(out))
    stored = np.asarray(img.dataobj)
    assert img.shape[2] == 5
    for n, (f, _) in slot_of_file.items():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        # the written voxel at this file's ImagePositionPatient carries this file's label
        ijk = np.linalg.inv(img.affine) @ np.r_[ipp * np.array([-1, -1, 1.0]), 1]
        np.testing.assert_allclose(ijk[:3], np.rint(ijk[:3]), atol=1e-2)
        i, j, k = np.rint(ijk[:3]).astype(int)
        assert (i, j) == (0, 0)
        assert np.all(stored[200:300, 200:300, k] == n)
        np.testing.assert_allclose(nifti_world_lps(img, (0, 0, k)), ipp, atol=0.01)
    assert np.all(stored[200:300, 200:300, 3] == 0)  # the missing slice holds nothing
