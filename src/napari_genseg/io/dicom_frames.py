"""DICOM image frames with their geometry: classic single-frame files and Enhanced multi-frame files.

A :class:`Frame` is one 2-D image plane: its file (and frame number in a multi-frame file),
ImagePositionPatient (0020,0032), ImageOrientationPatient (0020,0037), PixelSpacing (0028,0030),
RescaleSlope/Intercept/Type (0028,1053/1052/1054), ImageType (0008,0008) or FrameType
(0008,9007), and PixelPaddingValue/RangeLimit (0028,0120/0121).

Enhanced CT/MR Image Storage (PS3.3 C.7.6.16, "Multi-frame Functional Groups") keeps these per
frame in the Per-frame Functional Groups Sequence (5200,9230) or, when equal for all frames, in
the Shared Functional Groups Sequence (5200,9229): Plane Position Sequence (0020,9113), Plane
Orientation Sequence (0020,9116), Pixel Measures Sequence (0028,9110), Pixel Value
Transformation Sequence (0028,9145) and CT/MR Image Frame Type Sequence (0018,9329 / 0018,9226).
A per-frame item overrides a shared one.

Pixel data in compressed transfer syntaxes is decoded by pydicom's decoder plugins (python-gdcm
is a dependency of this package: JPEG lossless and baseline, JPEG-LS, JPEG 2000, RLE); a missing
decoder is reported in one line that names the package to install.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import one_line
from .nifti import VolumeReadError

__all__ = ["Frame", "frames_of", "is_image_object", "read_frame_pixels", "NON_IMAGE_SOP_CLASSES",
           "DECODER_PACKAGE"]

#: SOP classes that carry pixels but are not slices of an image series (skipped and reported)
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.66.5": "Surface Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.1.3.10": "Media Storage Directory (DICOMDIR)",
}

#: the package that gives pydicom a decoder for every compressed syntax it supports (GDCM:
#: JPEG baseline/lossless, JPEG-LS, JPEG 2000, RLE; Apache-2.0/BSD). pylibjpeg-libjpeg would
#: also decode JPEG lossless and JPEG-LS but is GPL-3.0, so it is not a dependency.
DECODER_PACKAGE = "python-gdcm"


@dataclass
class Frame:
    """One image plane of a DICOM object.

    Attributes:
        path: the file.
        index: frame number (0-based) inside a multi-frame file, None for a single-frame file.
        position: ImagePositionPatient, LPS mm of the first transmitted pixel's centre, or None.
        orientation: ImageOrientationPatient (row cosines, column cosines), or None.
        rows, cols: Rows, Columns.
        spacing: PixelSpacing (row spacing = between rows, column spacing = between columns) mm.
        slope, intercept, rescale_type: the modality LUT (stored value -> HU for CT).
        image_type: ImageType / FrameType values (upper case).
        padding: (PixelPaddingValue, PixelPaddingRangeLimit or None), stored values, or None.
        sop_uid: SOPInstanceUID (duplicates of one instance are dropped).
        transfer_syntax: the file's TransferSyntaxUID.
    """

    path: Path
    index: int | None
    position: np.ndarray | None
    orientation: np.ndarray | None
    rows: int
    cols: int
    spacing: tuple[float, float] | None
    slope: float
    intercept: float
    rescale_type: str
    image_type: tuple[str, ...]
    padding: tuple[int, int | None] | None
    sop_uid: str
    transfer_syntax: str

    @property
    def label(self) -> str:
        """File name (and frame number) for messages."""
        return self.path.name if self.index is None else f"{self.path.name} frame {self.index + 1}"

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type


def is_image_object(ds) -> bool:
    """True for DICOM objects that hold image planes (Rows/Columns), excluding SEG, RT Dose etc."""
    sop = str(ds.get("SOPClassUID", ""))
    return "Rows" in ds and "Columns" in ds and sop not in NON_IMAGE_SOP_CLASSES


def _floats(value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _group_item(groups: list, seq: str, attr: str):
    """First value of ``attr`` inside ``seq`` in the functional groups (per-frame first)."""
    for g in groups:
        if g is None or seq not in g:
            continue
        items = g[seq].value
        if items and attr in items[0]:
            return items[0][attr].value
    return None


def _padding(ds) -> tuple[int, int | None] | None:
    if "PixelPaddingValue" not in ds:
        return None
    try:
        pad = int(ds.PixelPaddingValue)
        lim = int(ds.PixelPaddingRangeLimit) if "PixelPaddingRangeLimit" in ds else None
    except (TypeError, ValueError):
        return None
    return pad, lim


def _image_type(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split("\\")
    return tuple(str(v).strip().upper() for v in value)


def frames_of(path: Path, ds) -> list[Frame]:
    """The image frames of one dataset (read without pixels), with per-frame geometry."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    sop = str(ds.get("SOPInstanceUID", path.name))
    padding = _padding(ds)
    top_spacing = _floats(ds.get("PixelSpacing"), 2)
    top_slope = float(ds.get("RescaleSlope", 1) or 1)
    top_inter = float(ds.get("RescaleIntercept", 0) or 0)
    top_type = str(ds.get("RescaleType", "") or "")
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        return [Frame(path, None, _floats(ds.get("ImagePositionPatient"), 3),
                      _floats(ds.get("ImageOrientationPatient"), 6), rows, cols,
                      None if top_spacing is None else (top_spacing[0], top_spacing[1]),
                      top_slope, top_inter, top_type, _image_type(ds.get("ImageType")), padding, sop,
                      tsyntax)]
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    per = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames = []
    for i in range(n):
        groups = [per[i] if i < len(per) else None, shared]
        spacing = _floats(_group_item(groups, "PixelMeasuresSequence", "PixelSpacing"), 2)
        if spacing is None:
            spacing = top_spacing
        slope = _group_item(groups, "PixelValueTransformationSequence", "RescaleSlope")
        inter = _group_item(groups, "PixelValueTransformationSequence", "RescaleIntercept")
        rtype = _group_item(groups, "PixelValueTransformationSequence", "RescaleType")
        ftype = (_group_item(groups, "CTImageFrameTypeSequence", "FrameType")
                 or _group_item(groups, "MRImageFrameTypeSequence", "FrameType")
                 or ds.get("ImageType"))
        frames.append(Frame(
            path, i,
            _floats(_group_item(groups, "PlanePositionSequence", "ImagePositionPatient"), 3),
            _floats(_group_item(groups, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            rows, cols, None if spacing is None else (spacing[0], spacing[1]),
            float(slope) if slope not in (None, "") else top_slope,
            float(inter) if inter not in (None, "") else top_inter,
            str(rtype) if rtype else top_type, _image_type(ftype), padding, sop, tsyntax,
        ))
    return frames


def _decode_error(path: Path, tsyntax: str, exc: Exception) -> VolumeReadError:
    import pydicom
    from pydicom.uid import UID

    name = UID(tsyntax).name if tsyntax else "unknown transfer syntax"
    try:
        decoder = pydicom.pixels.get_decoder(tsyntax) if tsyntax else None
    except NotImplementedError:
        return VolumeReadError(f"{path.name}: pydicom {pydicom.__version__} has no decoder for {name}; "
                               f"convert the series to an uncompressed syntax (gdcmconv --raw, dcmdjpeg)")
    if decoder is not None and not decoder.is_available:
        return VolumeReadError(f"{path.name}: no decoder installed for {name}; install one with: "
                               f"pip install {DECODER_PACKAGE}")
    return VolumeReadError(f"cannot decode the pixels of {path.name} ({name}): {one_line(exc)}")


def read_frame_pixels(path: Path, indices: list[int | None]) -> list[np.ndarray]:
    """Stored pixel values (rows, cols) of the given frames of one file (one decode per file)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise VolumeReadError(f"cannot read {path.name}: {one_line(exc)}") from exc
    tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise _decode_error(path, tsyntax, exc) from exc
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeReadError(f"{path.name} holds colour (RGB) pixels, not a CT slice")
    if nframes == 1 and arr.ndim == 2:
        arr = arr[None]
    out = []
    for i in indices:
        out.append(arr[0 if i is None else i])
    return out
