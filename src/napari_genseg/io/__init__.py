"""Volume input/output: NIfTI files and DICOM series in, NIfTI masks out."""

from __future__ import annotations

import os

from .dicom import read_dicom_series
from .discovery import Case, Discovery, case_name, discover, discover_inputs, looks_like_case
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
    "Case",
    "Discovery",
    "discover",
    "discover_inputs",
    "looks_like_case",
]


def load_volume(path: str | os.PathLike, series_uid: str | None = None):
    """Read the one case that ``path`` holds (NIfTI file, DICOM folder/file/DICOMDIR) -> Volume.

    What a path holds is decided by :func:`napari_genseg.io.discovery.discover`; a cohort (a
    folder of several studies or NIfTI files, a .txt list) raises VolumeReadError naming its cases.
    ``series_uid`` picks the DICOM series when a study holds several.
    """
    import warnings

    found = discover(path)
    for note in found.notes:
        warnings.warn(note, stacklevel=2)
    return found.single(os.fspath(path)).load(series_uid)
