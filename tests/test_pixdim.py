"""NIfTI headers whose voxel size comes from pixdim (no sform) with zero or negative pixdim:
one warning of ours (not nibabel's log line) and ``spacing_unknown`` in the volume and layer
metadata (the CLI side is in test_cli_checks.py)."""

from __future__ import annotations

import gzip
import struct
import warnings

import nibabel as nib
import numpy as np
import pytest

from napari_genseg.io import read_nifti

PIXDIM_OFFSET = 76  # NIfTI-1 header: float pixdim[8] at byte 76


def _raw_nifti(path, pixdim_xyz, qform_code=1, sform_code=0, data=None):
    """Write a NIfTI-1 file and patch pixdim[1..3] in its bytes (nibabel fixes them on save)."""
    if data is None:
        data = np.full((6, 5, 4), -1000, np.int16)
        data[1:5, 1:4, :] = 40
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    img = nib.Nifti1Image(data, aff)
    img.set_qform(aff, code=qform_code)
    img.set_sform(aff, code=sform_code)
    img.header.set_data_offset(352)
    raw = bytearray(img.header.binaryblock) + b"\0\0\0\0" + data.tobytes(order="F")
    raw[PIXDIM_OFFSET + 4 : PIXDIM_OFFSET + 16] = struct.pack("<3f", *pixdim_xyz)
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def test_zero_pixdim_warns_once_and_marks_spacing_unknown(tmp_path, caplog):
    from napari_genseg.ui.layers import GEOMETRY_KEY, geometry_metadata

    p = _raw_nifti(tmp_path / "zero.nii.gz", (0.0, 0.0, 0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = read_nifti(p)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "voxel spacing unknown" in msgs[0] and "pixdim along i, j, k is 0, 0, 0" in msgs[0]
    assert vol.meta["spacing_unknown"] is True
    assert geometry_metadata(vol)[GEOMETRY_KEY]["meta"]["spacing_unknown"] is True
    assert not [r for r in caplog.records if "pixdim" in r.getMessage()]  # nibabel's line is replaced


def test_negative_pixdim_warns(tmp_path):
    p = _raw_nifti(tmp_path / "neg.nii", (-2.0, 2.0, 3.0))
    with pytest.warns(UserWarning, match=r"pixdim along i is -2 \(negative: invalid NIfTI\)"):
        vol = read_nifti(p)
    assert vol.meta["spacing_unknown"] is True


def test_valid_sform_makes_pixdim_irrelevant(tmp_path):
    p = _raw_nifti(tmp_path / "sform.nii.gz", (0.0, 0.0, 0.0), qform_code=0, sform_code=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vol = read_nifti(p)
    assert vol.spacing == (3.0, 2.0, 2.0) and "spacing_unknown" not in vol.meta
