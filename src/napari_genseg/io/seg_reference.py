"""Read a reference DICOM Segmentation (SEG) object onto a CT volume's voxel grid.

Used to score a model against a reference mask stored as DICOM SEG (e.g. the dcmqi liver SEG of
the GE CT in ``../shared/data/dicom-robustness/ge-ct-3slice-liver``). Follows PS3.3 C.8.20
(Segmentation IOD): frames carry their geometry in the functional groups (PlanePositionSequence /
PlaneOrientationSequence / PixelMeasuresSequence, per frame or shared), segments are identified by
SegmentIdentificationSequence.ReferencedSegmentNumber.

Each frame's pixel centres are mapped to LPS world positions and then to the volume's display
voxels (``Volume`` axes (z, y, x) = (S, P, L)), so the mask lands on the right voxels whatever the
slice order or in-plane direction of either object. Only frames whose in-plane axes coincide with
the volume's axes (within 1e-3) are supported: an oblique SEG raises.

World positions are comparable only within one frame of reference (PS3.3 C.7.4.1): a SEG whose
FrameOfReferenceUID differs from the one of the DICOM series the volume was read from (its
``meta["frame_of_reference_uid"]``) is refused, whatever its positions (another study of the
same patient, or another patient scanned with the same protocol, lies on the same scanner grid).
A volume with no recorded frame of reference (NIfTI) is matched by position alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..volume import Volume

__all__ = ["SegReadError", "read_seg_labels"]


class SegReadError(InputError, ValueError):
    """The file is not a readable DICOM SEG, or its frames do not lie on the volume's grid."""


def _fg(frame, shared, name):
    for grp in (frame, shared):
        if grp is not None and name in grp:
            return grp[name].value[0]
    raise SegReadError(f"SEG frame has no {name}")


def read_seg_labels(path: str | Path, like: Volume, segments: dict[int, int] | None = None,
                    tolerance_vox: float = 0.25) -> np.ndarray:
    """The SEG at ``path`` as a label array on ``like``'s display grid.

    Args:
        path: a DICOM Segmentation Storage file (BINARY or FRACTIONAL; fractional frames are
            thresholded at 50 % of MaximumFractionalValue).
        like: the CT volume whose grid the labels are placed on (its ``origin``/``spacing`` in LPS mm).
        segments: SegmentNumber -> label id (default None: each segment number is its own label
            id); segments not in it are skipped, and an empty mapping is refused.
        tolerance_vox: how far (in voxels) a frame's pixel centres may lie off the volume's voxel
            centres before the SEG is refused as not on this grid.

    Returns:
        ``(z, y, x)`` uint8 (uint16 above 255) array, 0 = background.

    Raises:
        SegReadError: not a SEG, no segment mapped, another frame of reference than the
            volume's DICOM series, oblique frames, or frames off the volume's grid / outside it.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # noqa: BLE001 - pydicom raises several types for a non-DICOM file
        raise SegReadError(f"{path}: not a DICOM file ({exc})") from None
    if getattr(ds, "Modality", "") != "SEG" or "PerFrameFunctionalGroupsSequence" not in ds:
        raise SegReadError(f"{path}: not a DICOM Segmentation object (Modality {getattr(ds, 'Modality', '?')})")
    want = str((like.meta or {}).get("frame_of_reference_uid") or "")
    got = str(ds.get("FrameOfReferenceUID") or "")
    if want and got != want:
        raise SegReadError(f"{Path(path).name}: its frame of reference ({got or 'none'}) is not the image's "
                           f"({want}): the SEG was made on another scan, its positions do not apply")
    pix = ds.pixel_array
    if pix.ndim == 2:
        pix = pix[None]
    if ds.SegmentationType == "FRACTIONAL":
        pix = pix >= 0.5 * float(ds.MaximumFractionalValue)
    else:
        pix = pix > 0
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    if segments is None:
        seg_map = {int(s.SegmentNumber): int(s.SegmentNumber) for s in ds.get("SegmentSequence", [])}
    else:  # an empty mapping maps nothing: never fall back to the segment numbers
        seg_map = {int(k): int(v) for k, v in segments.items()}
    if not seg_map:
        raise SegReadError(f"{Path(path).name}: none of its segments maps to a label id "
                           f"(segments {sorted(int(s.SegmentNumber) for s in ds.get('SegmentSequence', []))})")
    out = np.zeros(like.shape, np.uint16 if max(seg_map.values()) > 255 else np.uint8)
    sp = np.asarray(like.spacing, float)  # (sz, sy, sx)
    org = np.asarray(like.origin, float)  # (S, P, L)
    rows, cols = int(ds.Rows), int(ds.Columns)
    for fi, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        seg_no = int(_fg(frame, shared, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        if seg_no not in seg_map:
            continue
        ipp = np.asarray(_fg(frame, shared, "PlanePositionSequence").ImagePositionPatient, float)
        iop = np.asarray(_fg(frame, shared, "PlaneOrientationSequence").ImageOrientationPatient, float)
        dy, dx = (float(v) for v in _fg(frame, shared, "PixelMeasuresSequence").PixelSpacing)
        row_dir, col_dir = iop[:3], iop[3:]  # LPS direction of increasing column / row index
        r, c = np.nonzero(pix[fi])
        if r.size == 0:
            continue
        # every axis of the frame must be one of the volume's (S, P, L) axes
        for d in (row_dir, col_dir):
            if np.sort(np.abs(d))[-2] > 1e-3:
                raise SegReadError(f"{path}: frame {fi + 1} is oblique to the volume's axes")
        world = ipp[None] + c[:, None] * dx * row_dir[None] + r[:, None] * dy * col_dir[None]  # (n, 3) L, P, S
        zyx = (world[:, ::-1] - org[None]) / sp[None]
        idx = np.rint(zyx).astype(np.int64)
        if np.abs(zyx - idx).max() > tolerance_vox:
            raise SegReadError(f"{path}: frame {fi + 1} lies between the volume's voxels "
                               f"(off by {np.abs(zyx - idx).max():.2f} voxel)")
        inside = np.all((idx >= 0) & (idx < np.asarray(like.shape)[None]), axis=1)
        if not inside.all():
            raise SegReadError(f"{path}: frame {fi + 1} reaches outside the volume")
        out[idx[:, 0], idx[:, 1], idx[:, 2]] = seg_map[seg_no]
    return out
