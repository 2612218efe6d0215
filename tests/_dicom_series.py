"""Small synthetic CT series written with pydicom, for geometry tests (tests only).

A series is a regular grid: voxel (i=column, j=row, k=slice) sits at
``origin + i * col_spacing * row_cos + j * row_spacing * col_cos + k * step`` (LPS mm), the
ImagePositionPatient of slice k being ``origin + k * step``. A *tilted* or *sheared* series is
one whose ``step`` is not along ``row_cos × col_cos``. One bright marker voxel of known world
position proves where a reader puts the voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def tilted_iop(deg: float) -> tuple[float, ...]:
    """Axial orientation with the column direction tilted by ``deg`` about the x axis."""
    t = np.deg2rad(deg)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t)))


@dataclass
class Series:
    """Parameters of a synthetic series (see module doc); ``write`` makes the files."""

    rows: int = 24
    cols: int = 28
    n: int = 12
    pixel_spacing: tuple[float, float] = (0.9, 0.8)  # (between rows, between columns)
    iop: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    step: tuple[float, float, float] = (0.0, 0.0, 2.5)
    origin: tuple[float, float, float] = (-12.0, -20.0, 30.0)
    marker: tuple[int, int, int] | None = None  # (i=column, j=row, k=slice)
    marker_hu: int = 2000
    background_hu: int = 40
    intercept: float = -1024.0
    gantry_tilt: float | None = None
    study_uid: str = "1.2.826.0.1.3680043.9.7.1.1"
    series_uid: str = "1.2.826.0.1.3680043.9.7.1.1.1"
    sop_root: str | None = None  # SOPInstanceUID = <sop_root or series_uid>.<k + 1>
    patient_id: str = "P001"
    series_number: int = 1
    description: str = "synthetic axial"
    name: str = "IM{k:04d}.dcm"  # format with k, or a callable k -> name
    extra: dict = field(default_factory=dict)  # attribute -> value for every slice

    def position(self, k: int) -> np.ndarray:
        return np.asarray(self.origin, float) + k * np.asarray(self.step, float)

    def world(self, i: int, j: int, k: int) -> np.ndarray:
        """LPS position (mm) of voxel (i=column, j=row, k=slice)."""
        row_cos, col_cos = np.asarray(self.iop[:3]), np.asarray(self.iop[3:])
        return self.position(k) + i * self.pixel_spacing[1] * row_cos + j * self.pixel_spacing[0] * col_cos

    def pixels(self, k: int) -> np.ndarray:
        """Stored values (rows, cols) of slice k: a body with a ramp and the marker."""
        hu = np.full((self.rows, self.cols), -1000, np.int32)
        hu[2:-2, 2:-2] = self.background_hu + (np.arange(self.cols)[None, 2:-2] % 7)
        if self.marker is not None and self.marker[2] == k:
            hu[self.marker[1], self.marker[0]] = self.marker_hu
        return (hu - int(self.intercept)).astype(np.int16)

    def dataset(self, k: int):
        import pydicom
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian

        sop = f"{self.sop_root or self.series_uid}.{k + 1}"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE
        ds.SOPInstanceUID = sop
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientID = self.patient_id
        ds.PatientName = "Synthetic^" + self.patient_id
        ds.StudyInstanceUID = self.study_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.SeriesInstanceUID = self.series_uid
        ds.SeriesNumber = self.series_number
        ds.SeriesDescription = self.description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in self.position(k)]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in self.iop]
        ds.PixelSpacing = [f"{v:.6f}" for v in self.pixel_spacing]
        ds.SliceThickness = f"{float(np.linalg.norm(self.step)):.4f}"
        if self.gantry_tilt is not None:
            ds.GantryDetectorTilt = f"{self.gantry_tilt:g}"
        ds.Rows, ds.Columns = self.rows, self.cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = f"{self.intercept:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        for key, value in self.extra.items():
            setattr(ds, key, value)
        ds.PixelData = self.pixels(k).tobytes()
        pydicom.dataset.validate_file_meta(ds.file_meta)
        return ds

    def filename(self, k: int) -> str:
        return self.name(k) if callable(self.name) else self.name.format(k=k)

    def write(self, folder: Path, slices=None) -> list[Path]:
        """Write slices (default all) into ``folder``; returns the paths in slice order."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k in range(self.n) if slices is None else slices:
            p = folder / self.filename(k)
            self.dataset(k).save_as(p, enforce_file_format=True)
            paths.append(p)
        return paths


def display_index_of(vol, lps) -> np.ndarray:
    """(z, y, x) display index (float) of an LPS point, from the napari placement of ``vol``."""
    kw = vol.layer_kwargs()
    scale, translate = np.asarray(kw["scale"]), np.asarray(kw["translate"])
    zyx_world = np.array([lps[2], lps[1], lps[0]])  # napari world = (S, P, L) mm
    return (zyx_world - translate) / scale


def world_of_display(vol, zyx) -> np.ndarray:
    """LPS position (mm) of display voxel (z, y, x): napari's data -> world with scale/translate."""
    kw = vol.layer_kwargs()
    w = np.asarray(kw["translate"]) + np.asarray(zyx, float) * np.asarray(kw["scale"])
    return np.array([w[2], w[1], w[0]])


def nifti_world_lps(img, ijk) -> np.ndarray:
    """LPS position (mm) of stored voxel ``ijk`` of a NIfTI image (its sform/qform affine)."""
    ras = img.affine @ np.r_[np.asarray(ijk, float), 1.0]
    return np.array([-ras[0], -ras[1], ras[2]])
