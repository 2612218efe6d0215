"""Label files (reference masks for evaluation, training and review), read with checks.

Two faults of label files pass silently through a plain reader:

* **non-integer ids**: a float label file (``0.988``, ``1.976`` after a stray ``scl_slope``) is
  truncated by ``astype(int)`` to 0 and 1. Ids within 1e-3 of an integer are rounded; anything
  else, NaN or a negative id is refused with one line.
* **another grid than the image**: a label file shifted by 7 mm (or cropped, or saved at another
  spacing) is paired voxel by voxel with the image. Here both grids are compared in world space
  (each file's affine, NIfTI sform/qform or DICOM geometry); a label file on another grid is
  resampled nearest-neighbour onto the image voxels through the two affines, with a warning that
  says how far apart the grids were; a label file that does not overlap the image is refused.

``labels_for_image`` is the one checked way to read a reference mask for an image; ``genseg
evaluate`` and ``genseg train`` (``training/data.py``) read every label file through it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..volume import Volume
from .nifti import VolumeReadError

__all__ = ["ID_TOLERANCE", "integer_label_ids", "read_label_file", "world_affine", "labels_for_image"]

#: largest distance of a float label id from an integer that is still read as that integer
ID_TOLERANCE = 1e-3


def integer_label_ids(data: np.ndarray, name: str = "labels", hint: str = "") -> np.ndarray:
    """Label ids as the smallest unsigned integer dtype (uint8, uint16 or uint32).

    Float ids within ``ID_TOLERANCE`` of an integer are rounded to it. Raises VolumeReadError
    (one line, naming up to three offending values) for non-finite, non-integer or negative ids.
    """
    data = np.asarray(data)
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            raise VolumeReadError(f"{name}: {int((~finite).sum())} label voxels are NaN/inf; label ids must be integers")
        rounded = np.rint(data)
        off = np.abs(data - rounded) > ID_TOLERANCE
        if off.any():
            vals = np.unique(data[off])[:3]
            shown = ", ".join(f"{v:.6g}" for v in vals)
            raise VolumeReadError(f"{name}: label ids must be integers; found {shown}"
                                  f"{' ...' if np.unique(data[off]).size > 3 else ''}{hint}")
        data = rounded
    elif data.dtype.kind not in "iu":
        raise VolumeReadError(f"{name}: label voxels of type {data.dtype} are not integer ids")
    if data.size and data.min() < 0:
        raise VolumeReadError(f"{name}: negative label id {data.min():g}; ids must be >= 0")
    top = int(data.max()) if data.size else 0
    for dt in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dt).max:
            return data.astype(dt)
    raise VolumeReadError(f"{name}: label id {top} is too large")


def _slope_hint(vol: Volume) -> str:
    if "scl_slope" not in vol.meta:
        return ""
    return (f" (the header scales the stored ids: scl_slope {vol.meta['scl_slope']:.6g}, "
            f"scl_inter {vol.meta['scl_inter']:.6g})")


def read_label_file(path: str | os.PathLike) -> Volume:
    """A label file (NIfTI, or anything ``load_volume`` reads) as a Volume of integer ids on
    its own grid (display convention). Raises VolumeReadError for non-integer ids."""
    from . import load_volume

    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = load_volume(path)
    if vol.meta.get("nan_voxels"):
        raise VolumeReadError(f"{path.name}: {vol.meta['nan_voxels']} label voxels are NaN/inf; "
                              f"label ids must be integers")
    for w in caught:  # the reader's other warnings (e.g. unknown spacing) still matter
        warnings.warn(w.message, w.category, stacklevel=2)
    ids = integer_label_ids(vol.data, path.name, _slope_hint(vol))
    return vol.with_data(ids)


def world_affine(vol: Volume) -> np.ndarray:
    """4x4 map from the display array's voxel index (x, y, z) = (data[z, y, x]) to RAS mm,
    including any obliquity of the source (its affine composed with the display reorientation)."""
    if vol.source_affine is None or vol.ornt is None or vol.source_shape is None:
        return vol.display_affine_ras
    import nibabel.orientations as no

    return np.asarray(vol.source_affine, float) @ no.inv_ornt_aff(vol.ornt, vol.source_shape)


def _corners(shape_xyz) -> np.ndarray:
    x, y, z = (np.array([0, n - 1]) for n in shape_xyz)
    g = np.array(np.meshgrid(x, y, z, indexing="ij")).reshape(3, -1)
    return np.vstack([g, np.ones(g.shape[1])])


def _is_dicom_seg(path) -> bool:
    """True for a DICOM Part-10 file whose Modality is SEG (reads the header only)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            fh.seek(128)
            if fh.read(4) != b"DICM":
                return False
    except OSError:
        return False
    import pydicom

    try:
        return getattr(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["Modality"]),
                       "Modality", "") == "SEG"
    except Exception:  # noqa: BLE001 - a damaged header is left to the NIfTI/DICOM readers' errors
        return False


def labels_for_image(image: Volume, labels: Volume | str | os.PathLike,
                     name: str | None = None) -> tuple[np.ndarray, list[str]]:
    """The label ids of ``labels`` (a path or a Volume) on ``image``'s voxels: a (z, y, x) array
    of the image's shape, and the warnings (one line each).

    A DICOM Segmentation file (Modality SEG) is placed on the image by its frames' world positions
    (:func:`napari_genseg.io.seg_reference.read_seg_labels`; label id = SegmentNumber).

    Same grid (every corner voxel within 0.1 voxel, and at most 1e-3 mm): the ids as they are.
    Another grid: nearest-neighbour resampling through both affines (``scipy.ndimage
    .affine_transform``, order 0; image voxels outside the label grid get 0) with a warning.
    Raises VolumeReadError for non-integer ids and for label files that cover no image voxel.
    """
    from scipy import ndimage as ndi

    if not isinstance(labels, Volume) and _is_dicom_seg(labels):
        from .seg_reference import read_seg_labels

        return read_seg_labels(labels, image), []
    if not isinstance(labels, Volume):
        name = name or Path(labels).name
        labels = read_label_file(labels)
    else:
        labels = labels.with_data(integer_label_ids(labels.data, name or "labels"))
    name = name or "labels"
    a_img, a_lab = world_affine(image), world_affine(labels)
    shape_img = image.shape[::-1]  # (x, y, z)
    shape_lab = labels.shape[::-1]
    c = _corners(shape_img)
    tol = max(1e-3, 0.1 * min(image.spacing))
    if shape_img == shape_lab and np.abs((a_img @ c - a_lab @ c)[:3]).max() <= tol:
        return np.asarray(labels.data), []
    m = np.linalg.inv(a_lab) @ a_img  # image voxel (x, y, z) -> label voxel (x, y, z)
    src = np.transpose(labels.data, (2, 1, 0))
    out = ndi.affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=shape_img, order=0,
                               mode="constant", cval=0, prefilter=False)
    lab_c = m @ c
    lo, hi = np.floor(lab_c[:3].min(1)), np.ceil(lab_c[:3].max(1))
    inside = ndi.affine_transform(np.ones(shape_lab, np.uint8), m[:3, :3], offset=m[:3, 3],
                                  output_shape=shape_img, order=0, mode="constant", cval=0,
                                  prefilter=False)
    cover = float(inside.mean())
    if cover == 0.0:
        raise VolumeReadError(
            f"{name} does not overlap the image in world space (label voxels {lo.astype(int).tolist()}"
            f"..{hi.astype(int).tolist()} at the image corners): wrong pair or wrong header")
    shift = float(np.linalg.norm(a_lab[:3, 3] - a_img[:3, 3]))
    parts = [f"voxel (0, 0, 0) {shift:.1f} mm apart"]
    if shape_img != shape_lab:
        parts.append(f"shape {labels.shape} vs image {image.shape}")
    sp_l = tuple(round(s, 3) for s in labels.spacing)
    if np.max(np.abs(np.subtract(labels.spacing, image.spacing))) > 1e-3:
        parts.append(f"spacing {sp_l} vs {tuple(round(s, 3) for s in image.spacing)} mm")
    msg = (f"{name} is on another grid than the image ({'; '.join(parts)}): resampled "
           f"nearest-neighbour onto the image voxels by the headers' geometry")
    if cover < 0.999:
        msg += f"; it covers {100 * cover:.0f} % of the image (the rest is background)"
    return np.ascontiguousarray(np.transpose(out, (2, 1, 0))), [msg]
