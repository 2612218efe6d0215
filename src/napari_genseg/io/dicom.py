"""DICOM CT series (a folder of single-frame slices) to a Volume in HU.

* files are grouped by SeriesInstanceUID; the series with the most slices is read (the choice and
  the others are reported in ``meta["warnings"]``); a tie must be resolved with ``series_uid``;
* slices are sorted by ImagePositionPatient projected on the slice normal (row × column
  direction cosines), never by file name or InstanceNumber;
* voxels are converted to HU with RescaleSlope/RescaleIntercept (per slice);
* the slice spacing comes from the position deltas (not SliceThickness); uneven spacing and
  missing slices are reported as warnings;
* the geometry becomes a RAS affine (DICOM LPS with x, y negated) and then the display
  convention of :mod:`napari_genseg.volume`.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from .nifti import VolumeReadError, volume_from_array

__all__ = ["read_dicom_series", "list_series", "dicom_files"]


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR")


def list_series(folder: str | os.PathLike) -> dict[str, list]:
    """SeriesInstanceUID -> list of (path, dataset without pixels) for CT-like image slices."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    series: dict[str, list] = defaultdict(list)
    for p in dicom_files(folder):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError):
            continue
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            continue
        uid = str(ds.get("SeriesInstanceUID", "unknown"))
        series[uid].append((p, ds))
    return dict(series)


def _describe(uid: str, items: list) -> str:
    ds = items[0][1]
    desc = str(ds.get("SeriesDescription", "")).strip() or "no description"
    return f"series {ds.get('SeriesNumber', '?')} '{desc}' ({len(items)} slices, UID {uid})"


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None):
    """Read the largest (or the given) CT series of ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeReadError(f"not a folder: {folder}")
    series = list_series(folder)
    if not series:
        raise VolumeReadError(f"{folder} holds no DICOM image slices")
    notes: list[str] = []
    if series_uid is not None:
        if series_uid not in series:
            raise VolumeReadError(f"series {series_uid} is not in {folder}")
        uid = series_uid
    else:
        ranked = sorted(series.items(), key=lambda kv: -len(kv[1]))
        if len(ranked) > 1 and len(ranked[0][1]) == len(ranked[1][1]):
            names = "; ".join(_describe(u, it) for u, it in ranked)
            raise VolumeReadError(
                f"{folder.name} holds {len(ranked)} series of equal size; choose one by UID: {names}"
            )
        uid = ranked[0][0]
        if len(ranked) > 1:
            others = "; ".join(_describe(u, it) for u, it in ranked[1:])
            notes.append(f"{folder.name} holds {len(ranked)} series; read the largest, "
                         f"{_describe(uid, series[uid])}; skipped: {others}")
    items = series[uid]
    if len(items) < 2:
        raise VolumeReadError(f"{_describe(uid, items)} has a single slice: not a CT volume")
    return _assemble(items, folder, uid, notes)


def _assemble(items: list, folder: Path, uid: str, notes: list[str]):
    import pydicom

    first = items[0][1]
    iop = np.array([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    rows, cols = int(first.Rows), int(first.Columns)
    for p, ds in items:
        other = np.array([float(v) for v in ds.ImageOrientationPatient])
        if not np.allclose(other, iop, atol=1e-4):
            raise VolumeReadError(f"{p.name}: slice orientation differs within the series")
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise VolumeReadError(f"{p.name}: slice size differs within the series")
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in items])
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    items = [items[i] for i in order]
    dist, pos = dist[order], pos[order]
    deltas = np.diff(dist)
    if np.any(deltas < 1e-4):
        n = int(np.sum(deltas < 1e-4))
        raise VolumeReadError(f"{n} slices share a position: duplicated slices or several series under one UID")
    dz = float(np.median(deltas))
    if np.max(np.abs(deltas - dz)) > 0.01 * dz + 1e-3:
        gaps = int(np.sum(np.round(deltas / dz) > 1))
        msg = (f"uneven slice spacing: {deltas.min():.3f}..{deltas.max():.3f} mm (median {dz:.3f} mm)")
        if gaps:
            msg += f"; about {int(np.sum(np.round(deltas / dz) - 1))} slices missing in {gaps} gap(s)"
        msg += "; the volume uses the median spacing"
        notes.append(msg)
    ps = [float(v) for v in first.PixelSpacing]  # (row spacing, column spacing)
    # voxel (i=column, j=row, k=slice) -> LPS
    lps = np.eye(4)
    lps[:3, 0] = row_cos * ps[1]
    lps[:3, 1] = col_cos * ps[0]
    lps[:3, 2] = normal * dz
    lps[:3, 3] = pos[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    slices = []
    integral = True
    for p, _ in items:
        try:
            ds = pydicom.dcmread(p)
            arr = ds.pixel_array
        except Exception as exc:
            raise VolumeReadError(f"cannot read the pixels of {p.name}: {exc}") from exc
        slope = float(ds.get("RescaleSlope", 1) or 1)
        inter = float(ds.get("RescaleIntercept", 0) or 0)
        hu = arr.astype(np.float32) * slope + inter
        integral &= slope == int(slope) and inter == int(inter)
        slices.append(hu.T)  # (rows, cols) -> (i=col, j=row)
    data = np.stack(slices, axis=-1)
    if integral and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    for n in notes:
        warnings.warn(n, stacklevel=3)
    meta = {
        "format": "dicom",
        "series_uid": uid,
        "series_description": str(first.get("SeriesDescription") or ""),
        "modality": str(first.get("Modality", "")),
        "n_slices": len(items),
        "slice_spacing_mm": dz,
        "files_in_order": [str(p) for p, _ in items],
        "warnings": notes,
    }
    if meta["modality"] and meta["modality"] != "CT":
        notes.append(f"modality is {meta['modality']}, not CT: HU presets may not apply")
    return volume_from_array(data, ras, header=None, source_path=str(folder), meta=meta)
