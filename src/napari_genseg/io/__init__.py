"""Volume input/output: NIfTI files and DICOM series in, NIfTI masks out."""

from __future__ import annotations

import os
from pathlib import Path

from .dicom import read_dicom_series
from .nifti import MaskWriteError, VolumeReadError, is_nifti_path, read_nifti, write_mask

__all__ = [
    "load_volume",
    "read_nifti",
    "read_dicom_series",
    "write_mask",
    "VolumeReadError",
    "MaskWriteError",
    "is_nifti_path",
    "case_name",
]


def case_name(path: str | os.PathLike) -> str:
    """File or folder name without .nii/.nii.gz (a case's name in layers and outputs)."""
    name = Path(path).name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def load_volume(path: str | os.PathLike, series_uid: str | None = None):
    """A NIfTI file, a DICOM folder, or one DICOM file (its folder's series) -> Volume."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid=series_uid)
    if not path.exists():
        raise VolumeReadError(f"no such file or folder: {path}")
    if is_nifti_path(path):
        return read_nifti(path)
    if path.suffix.lower() in (".dcm", ".ima", "") :
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise VolumeReadError(f"{path.name} is neither NIfTI nor DICOM: {exc}") from exc
        return read_dicom_series(path.parent, series_uid=series_uid or str(ds.SeriesInstanceUID))
    raise VolumeReadError(f"{path.name}: unsupported input (expected .nii, .nii.gz or a DICOM folder)")
