"""DICOM CT series (single-frame slices or one Enhanced multi-frame file) to a Volume in HU.

* image objects are grouped by SeriesInstanceUID; the series with the most frames is read (the
  choice and the others are reported in ``meta["warnings"]``); a tie must be resolved with
  ``series_uid``. Non-image objects of the study (SEG, RT Dose, ...) are skipped and reported;
* frames without ImagePositionPatient/ImageOrientationPatient are skipped and listed;
* a small minority (at most 10 %) of frames that do not belong to the volume (ImageType or
  FrameType LOCALIZER, another orientation or matrix size) is dropped and listed; a series that
  splits into comparable groups is refused (it is not one volume); LOCALIZER frames are always
  dropped while they are a minority;
* frames are sorted by ImagePositionPatient projected on the slice normal (row × column
  direction cosines), never by file name or InstanceNumber; several frames at one position are
  refused (not one volume);
* missing slices (a gap of a whole number of slice steps) are inserted as air so every slice
  keeps its true position (a mask written back lands on the right slices); uneven spacing that
  is no such gap is reported with the largest position error;
* the slice step is the true step between positions (least squares over all slices), so a tilted
  gantry (positions not along the normal) gives a sheared affine: the volume is shown resampled
  on an axis-aligned grid and masks are written back on the original voxels
  (:mod:`napari_genseg.io.shear`); the tilt angle is reported, and compared with
  GantryDetectorTilt (0018,1120) when that is set;
* voxels are converted to HU with RescaleSlope/RescaleIntercept (per frame); PixelPaddingValue
  (0028,0120) (and PixelPaddingRangeLimit (0028,0121)) pixels become air (-1024 HU for CT);
* the geometry becomes a RAS affine (DICOM LPS with x, y negated) and then the display
  convention of :mod:`napari_genseg.volume`.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from .dicom_frames import NON_IMAGE_SOP_CLASSES, Frame, frames_of, is_image_object, read_frame_pixels
from .nifti import VolumeReadError, volume_from_array
from .shear import measure_shear

__all__ = ["read_dicom_series", "read_dicom_headers", "read_header", "read_headers", "list_series", "dicom_files",
           "AIR_HU", "ODD_FRACTION"]

#: HU given to padding pixels and to inserted missing slices of a CT
AIR_HU = -1024.0
#: largest fraction of a series' frames dropped as not belonging (other orientation/size)
ODD_FRACTION = 0.10


def dicom_files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file under ``folder`` except DICOMDIR (sorted)."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.is_file() and p.name.upper() != "DICOMDIR" and not p.name.startswith("."))


def read_header(path: str | os.PathLike):
    """The dataset (without pixels) of a DICOM file whatever its name, or None.

    A Part 10 file has "DICM" at byte 128; an old file without the preamble is accepted when it
    starts with a group 0002/0008 tag and parses to a dataset with a SOPClassUID or Rows.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    part10 = len(head) == 132 and head[128:132] == b"DICM"
    if not part10 and head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not part10)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, OverflowError):
        return None
    if not part10 and "SOPClassUID" not in ds and "Rows" not in ds:
        return None
    return ds


def read_headers(files) -> list[tuple[Path, object]]:
    """(path, dataset without pixels) for every readable DICOM file among ``files``."""
    out = []
    for p in files:
        ds = read_header(p)
        if ds is not None:
            out.append((Path(p), ds))
    return out


def list_series(folder: str | os.PathLike) -> dict[str, list]:
    """SeriesInstanceUID -> list of (path, dataset without pixels) for the image objects of ``folder``."""
    series, _ = _group_series(read_headers(dicom_files(Path(folder))))
    return series


def _group_series(headers) -> tuple[dict[str, list], dict[str, int]]:
    series: dict[str, list] = defaultdict(list)
    skipped: dict[str, int] = defaultdict(int)
    for p, ds in headers:
        if not is_image_object(ds):
            kind = NON_IMAGE_SOP_CLASSES.get(str(ds.get("SOPClassUID", "")))
            if kind is None:
                kind = str(ds.get("Modality", "") or "non-image") + " object"
            skipped[kind] += 1
            continue
        series[str(ds.get("SeriesInstanceUID", "unknown"))].append((p, ds))
    return dict(series), dict(skipped)


def _nframes(items) -> int:
    return sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in items)


def _describe(uid: str, items: list) -> str:
    ds = items[0][1]
    desc = str(ds.get("SeriesDescription", "")).strip() or "no description"
    return f"series {ds.get('SeriesNumber', '?')} '{desc}' ({_nframes(items)} slices, UID {uid})"


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None):
    """Read the largest (or the given) image series under ``folder`` (all files, recursively).

    Raises VolumeReadError (one line) when the folder holds no image series, the series is not
    one volume, or its pixels cannot be decoded. See the module docstring for every rule.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeReadError(f"not a folder: {folder}")
    return read_dicom_headers(read_headers(dicom_files(folder)), series_uid=series_uid,
                              source_path=folder, name=folder.name)


def read_dicom_headers(headers, series_uid: str | None = None, source_path=None, name: str = "DICOM"):
    """Read one series out of already-read headers ``[(path, dataset without pixels)]``.

    The largest series is chosen unless ``series_uid`` is given; the others are reported.
    Returns a Volume in HU (display convention, spacing/origin in mm); ``meta["warnings"]`` lists
    every report (each also issued as a UserWarning). Raises VolumeReadError (one line) for a
    missing or ambiguous series, a series that is not one volume, or undecodable pixels.
    """
    series, skipped = _group_series(headers)
    if not series:
        raise VolumeReadError(f"{name} holds no DICOM image slices")
    notes: list[str] = []
    if skipped:
        notes.append("skipped " + ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()))
                     + " (not image slices)")
    if series_uid is not None:
        if series_uid not in series:
            names = "; ".join(_describe(u, it) for u, it in series.items())
            raise VolumeReadError(f"series {series_uid} is not in {name}; it holds: {names}")
        uid = series_uid
    else:
        ranked = sorted(series.items(), key=lambda kv: -_nframes(kv[1]))
        if len(ranked) > 1 and _nframes(ranked[0][1]) == _nframes(ranked[1][1]):
            names = "; ".join(_describe(u, it) for u, it in ranked)
            raise VolumeReadError(
                f"{name} holds {len(ranked)} series of equal size; choose one by UID (--series): {names}"
            )
        uid = ranked[0][0]
        if len(ranked) > 1:
            others = "; ".join(_describe(u, it) for u, it in ranked[1:])
            notes.append(f"{name} holds {len(ranked)} series; read the largest, "
                         f"{_describe(uid, series[uid])}; skipped: {others}")
    items = sorted(series[uid], key=lambda it: str(it[0]))
    frames = [f for p, ds in items for f in frames_of(p, ds)]
    return _assemble(frames, items[0][1], uid, notes, source_path, _describe(uid, items))


def _list(frames: list[Frame], limit: int = 5) -> str:
    names = [f.label for f in frames[:limit]]
    more = f" and {len(frames) - limit} more" if len(frames) > limit else ""
    return ", ".join(names) + more


def _same_geometry(a: Frame, b: Frame) -> bool:
    return (a.rows == b.rows and a.cols == b.cols
            and np.allclose(a.orientation, b.orientation, atol=1e-3)
            and np.allclose(a.spacing, b.spacing, rtol=1e-3, atol=1e-4))


def _describe_group(g: list[Frame]) -> str:
    f = g[0]
    iop = ", ".join(f"{v:.3g}" for v in f.orientation)
    return f"{len(g)} slices {f.rows}x{f.cols} at orientation ({iop})"


def _keep_volume_frames(frames: list[Frame], desc: str, notes: list[str]) -> list[Frame]:
    """Drop duplicates, frames without geometry, localizers and a small minority of odd frames."""
    seen, unique = set(), []
    for f in frames:
        key = (f.sop_uid, f.index)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if len(unique) < len(frames):
        notes.append(f"{len(frames) - len(unique)} duplicate copies of the same instances ignored")
    frames = unique
    no_geo = [f for f in frames if f.position is None or f.orientation is None]
    if no_geo:
        notes.append(f"skipped {len(no_geo)} of {len(frames)} slices without ImagePositionPatient/"
                     f"ImageOrientationPatient: {_list(no_geo)}")
    frames = [f for f in frames if f.position is not None and f.orientation is not None]
    no_spacing = [f for f in frames if f.spacing is None or min(f.spacing) <= 0]
    if no_spacing:
        notes.append(f"skipped {len(no_spacing)} of {len(frames)} slices without a valid PixelSpacing "
                     f"(0028,0030): {_list(no_spacing)}")
        frames = [f for f in frames if f.spacing is not None and min(f.spacing) > 0]
    if len(frames) < 2:
        raise VolumeReadError(f"{desc}: only {len(frames)} slice(s) with ImagePositionPatient, "
                              f"ImageOrientationPatient and PixelSpacing: not a volume")
    groups: list[list[Frame]] = []
    for f in frames:
        for g in groups:
            if _same_geometry(g[0], f):
                g.append(f)
                break
        else:
            groups.append([f])
    localizers = [f for f in frames if f.is_localizer]
    if len(localizers) * 2 >= len(frames):
        localizers = []  # a localizer series read on purpose: judged by geometry alone
    loc_ids = {id(f) for f in localizers}
    main = max(groups, key=lambda g: sum(id(f) not in loc_ids for f in g))
    main_ids = {id(f) for f in main}
    odd = [f for f in frames if id(f) not in main_ids and id(f) not in loc_ids]
    if len(groups) > 1 and len(odd) > ODD_FRACTION * len(frames):
        parts = " + ".join(_describe_group(g) for g in sorted(groups, key=len, reverse=True))
        raise VolumeReadError(f"{desc} is not one volume: its slices differ in orientation or size "
                              f"({parts}); choose another series")
    dropped = localizers + odd
    if dropped:
        why = []
        if localizers:
            why.append(f"{len(localizers)} LOCALIZER ({_list(localizers)})")
        if odd:
            g = main[0]
            why.append(f"{len(odd)} with another orientation or size than the {g.rows}x{g.cols} "
                       f"slices ({_list(odd)})")
        notes.append(f"dropped {len(dropped)} of {len(frames)} slices that are not part of the volume: "
                     + "; ".join(why))
    keep = [f for f in main if id(f) not in loc_ids]
    if len(keep) < 2:
        raise VolumeReadError(f"{desc}: a single slice is left after dropping localizers: not a volume")
    return keep


def _slice_grid(frames: list[Frame], desc: str, notes: list[str]):
    """Sort along the normal and place each frame in a regular slot grid.

    Returns (frames sorted, slot index per frame, number of slots, first position p0, step
    vector, normal spacing dz).
    """
    iop = frames[0].orientation
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    pos = np.array([f.position for f in frames])
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    frames = [frames[i] for i in order]
    pos, dist = pos[order], dist[order]
    deltas = np.diff(dist)
    if np.any(deltas < 1e-3):
        k = int(np.argmin(deltas))
        n = int(np.sum(deltas < 1e-3)) + 1
        raise VolumeReadError(
            f"{desc} is not one volume: {n} slices share a position ({frames[k].label} and "
            f"{frames[k + 1].label} at {dist[k]:.2f} mm along the normal): several acquisitions, "
            f"echoes or phases under one series UID"
        )
    dz = float(np.median(deltas))
    slots = np.rint((dist - dist[0]) / dz).astype(int)
    off_grid = np.abs(dist - dist[0] - slots * dz)
    if float(off_grid.max()) <= 0.1 * dz and len(np.unique(slots)) == len(slots):
        n_slots = int(slots[-1]) + 1
        missing = n_slots - len(frames)
        if missing:
            gaps = [f"{dist[i]:.2f}..{dist[i + 1]:.2f} mm" for i in np.nonzero(np.diff(slots) > 1)[0]]
            notes.append(f"{missing} slice(s) missing (slice step {dz:.3f} mm; gaps at {', '.join(gaps)} "
                         f"along the normal): shown as empty (air) slices so every slice keeps its "
                         f"true position")
    else:
        slots = np.arange(len(frames))
        n_slots = len(frames)
        err = float(np.max(np.abs(dist - dist[0] - slots * dz)))
        notes.append(f"uneven slice spacing: {deltas.min():.3f}..{deltas.max():.3f} mm (median {dz:.3f} mm) "
                     f"that is no whole number of steps; the volume uses the median spacing, so slices "
                     f"(and masks written back) are off by up to {err:.2f} mm")
    # least-squares fit pos = p0 + slot * step: the true step, tilted when the gantry was
    design = np.stack([np.ones(len(slots)), slots.astype(np.float64)], axis=1)
    coef, *_ = np.linalg.lstsq(design, pos, rcond=None)
    p0, step = coef[0], coef[1]
    resid = float(np.max(np.linalg.norm(design @ coef - pos, axis=1)))
    if resid > 0.5 * min(frames[0].spacing):
        notes.append(f"slice positions do not lie on one line (up to {resid:.2f} mm off): the "
                     f"geometry is approximate")
    return frames, slots, n_slots, p0, step, float(step @ normal)


def _air_value(frames: list[Frame], modality: str, data_min: float) -> float:
    hu = modality == "CT" and frames[0].rescale_type.upper() in ("", "HU")
    return AIR_HU if hu else data_min


def _read_hu(frames: list[Frame]) -> tuple[list[np.ndarray], int]:
    """HU (float32, (rows, cols)) per frame and the number of padding pixels found."""
    by_file: dict[Path, list[int]] = defaultdict(list)
    for k, f in enumerate(frames):
        by_file[f.path].append(k)
    out: list[np.ndarray | None] = [None] * len(frames)
    n_pad = 0
    for path, ks in by_file.items():
        arrays = read_frame_pixels(path, [frames[k].index for k in ks])
        for k, arr in zip(ks, arrays):
            f = frames[k]
            if arr.shape != (f.rows, f.cols):
                raise VolumeReadError(f"{f.label}: pixel data {arr.shape} does not match Rows x Columns "
                                      f"{f.rows}x{f.cols}")
            hu = arr.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept)
            if f.padding is not None:
                pad = _padding_mask(arr, f.padding)
                n_pad += int(pad.sum())
                hu[pad] = np.nan  # replaced by air once the series' range is known
            out[k] = hu
    return out, n_pad


def _padding_mask(arr: np.ndarray, padding: tuple[int, int | None]) -> np.ndarray:
    """Stored pixels equal to PixelPaddingValue, or within [value, PixelPaddingRangeLimit]."""
    bits = arr.dtype.itemsize * 8
    vals = []
    for v in padding:
        if v is None:
            vals.append(None)
            continue
        if arr.dtype.kind == "i" and v >= 2 ** (bits - 1):  # US-encoded value of a signed image
            v -= 2 ** bits
        vals.append(v)
    pad, lim = vals
    if lim is None:
        return arr == pad
    lo, hi = min(pad, lim), max(pad, lim)
    return (arr >= lo) & (arr <= hi)


def _assemble(frames: list[Frame], first, uid: str, notes: list[str], source_path, desc: str):
    frames = _keep_volume_frames(frames, desc, notes)
    frames, slots, n_slots, p0, step, dz = _slice_grid(frames, desc, notes)
    f0 = frames[0]
    row_cos, col_cos = f0.orientation[:3], f0.orientation[3:]
    ps_row, ps_col = f0.spacing  # (between rows, between columns)
    # voxel (i=column, j=row, k=slot) -> LPS
    lps = np.eye(4)
    lps[:3, 0] = row_cos * ps_col
    lps[:3, 1] = col_cos * ps_row
    lps[:3, 2] = step
    lps[:3, 3] = p0
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    modality = str(first.get("Modality", "") or "")
    hu_slices, n_pad = _read_hu(frames)
    finite_min = min(float(np.nanmin(h)) if np.isfinite(h).any() else np.inf for h in hu_slices)
    air = _air_value(frames, modality, finite_min if np.isfinite(finite_min) else 0.0)
    data = np.full((f0.cols, f0.rows, n_slots), air, dtype=np.float32)
    integral = True
    for f, slot, hu in zip(frames, slots, hu_slices):
        np.nan_to_num(hu, copy=False, nan=air)
        data[:, :, slot] = hu.T  # (rows, cols) -> (i=col, j=row)
        integral &= float(f.slope).is_integer() and float(f.intercept).is_integer()
    if n_pad:
        notes.append(f"{n_pad} PixelPaddingValue pixels (outside the scanned field) set to air ({air:g})")
    if integral and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    if modality and modality != "CT":
        notes.append(f"modality is {modality}, not CT: HU presets may not apply")
    shear = measure_shear(ras, data.shape)
    tilt_tag = first.get("GantryDetectorTilt")
    meta_tilt = {}
    if tilt_tag not in (None, ""):
        tag = float(tilt_tag)
        meta_tilt["gantry_detector_tilt_deg"] = tag
        if abs(tag) > 0.01:
            normal = np.cross(row_cos, col_cos)
            plane_tilt = float(np.degrees(np.arccos(np.clip(np.max(np.abs(normal)), -1.0, 1.0))))
            seen = shear.angle_deg if shear.sheared else plane_tilt
            agree = "agrees" if abs(abs(tag) - seen) < 0.5 else "differs; the geometry is used"
            how = ("the slice positions show" if shear.sheared else
                   "positions step along the slice normal (no shear); the slice planes are tilted")
            notes.append(f"GantryDetectorTilt (0018,1120) is {tag:g} deg; {how} {seen:.2f} deg ({agree})")
    for n in notes:
        warnings.warn(n, stacklevel=3)
    meta = {
        "format": "dicom",
        "series_uid": uid,
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID") or ""),
        "series_description": str(first.get("SeriesDescription") or ""),
        "modality": modality,
        "n_slices": len(frames),
        "n_slots": n_slots,
        "slice_spacing_mm": dz,
        "files_in_order": [str(f.path) if f.index is None else f"{f.path}#{f.index}" for f in frames],
        "warnings": list(notes),
        **meta_tilt,
    }
    return volume_from_array(data, ras, header=None, source_path=str(source_path) if source_path else None,
                             meta=meta, order=1, fill=air)
