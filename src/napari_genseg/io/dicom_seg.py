"""DICOM Segmentation (SEG) output for DICOM sources, written with highdicom.

One BINARY segment per foreground class present in the mask, coded with SNOMED CT (the codes of
pydicom's code dictionary, ``pydicom.sr.codedict.codes.SCT``; kidney sides as a Right/Left
SegmentedPropertyTypeModifier), a display colour (CIELab), the algorithm (name, version and the
checkpoint's SHA-256 as an algorithm parameter), and SegmentAlgorithmType AUTOMATIC for classes
left as the model made them or SEMIAUTOMATIC for classes the user edited.

Frames are the SOURCE images: the mask on the display grid is first put back on the source's
stored voxels exactly as the NIfTI writer does (:func:`napari_genseg.io.nifti.labels_to_stored`:
reorientation, or nearest-neighbour pull-back of a gantry-tilted series that is shown resampled),
then stored slice ``k`` becomes the frame of the source image whose ImagePositionPatient lies at
slot ``k`` of the volume. Each SEG frame therefore references its source SOP instance and carries
that image's own position and orientation; missing slices (air slots) have no source image and
no frame. The source headers are read again (without pixels) from the files the reader used
(``Volume.meta["files_in_order"]``, or the series ``meta["series_uid"]`` under ``source_path``
when a napari layer dropped that list).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..volume import Volume
from .atomic import atomic_path, same_file
from .nifti import MaskWriteError, checked_mask_labels, labels_to_stored

__all__ = ["write_dicom_seg", "is_dicom_seg_path", "class_codes", "segment_classes", "SEG_SERIES_NUMBER"]

#: SeriesNumber of a written SEG when the source has none (else source + 1000)
SEG_SERIES_NUMBER = 1000

# (category, type, laterality or None, RGB 0-255); names are normalised (lower case, "_")
_ORGAN_RGB = {
    "liver": (221, 130, 101), "spleen": (157, 108, 162), "kidney": (185, 102, 83),
    "pancreas": (249, 180, 111), "bone": (241, 214, 145), "lesion": (144, 238, 144),
    "urinary_bladder": (222, 154, 132), "lung": (197, 165, 145), "heart": (206, 110, 84),
    "bowel": (205, 167, 142), "stomach": (216, 132, 105), "gallbladder": (139, 150, 98),
    "aorta": (224, 97, 76),
}
_ALIASES = {
    "kidney_right": ("kidney", "right"), "right_kidney": ("kidney", "right"),
    "kidney_left": ("kidney", "left"), "left_kidney": ("kidney", "left"),
    "lungs": ("lung", None), "lung_right": ("lung", "right"), "right_lung": ("lung", "right"),
    "lung_left": ("lung", "left"), "left_lung": ("lung", "left"),
    "bladder": ("urinary_bladder", None), "intestine": ("bowel", None),
    "tumor": ("lesion", None), "tumour": ("lesion", None), "liver_lesion": ("lesion", None),
    "liver_tumor": ("lesion", None), "gall_bladder": ("gallbladder", None),
}
#: fallback colours for classes without an organ colour (the Review dock's palette, RGB 0-1)
_PALETTE = [(0.90, 0.35, 0.20), (0.25, 0.55, 0.95), (0.30, 0.80, 0.35), (0.95, 0.80, 0.20),
            (0.75, 0.40, 0.85), (0.20, 0.85, 0.85), (0.95, 0.55, 0.75), (0.60, 0.60, 0.60)]


def is_dicom_seg_path(path: str | os.PathLike) -> bool:
    """True for an output name that asks for a DICOM SEG (``.dcm``)."""
    return str(path).lower().endswith(".dcm")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


def class_codes(name: str):
    """SNOMED CT coding of a class name -> (category, type, laterality modifier or None, known).

    Organs: category Anatomical Structure (SCT 91723000); a lesion/tumour: Morphologically
    Abnormal Structure (SCT 49755003) with type Lesion (SCT 52988006). Unknown names: category
    and type Tissue (SCT 85756007), ``known`` False (the SegmentLabel keeps the class name).
    """
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    key = _norm(name)
    base, side = _ALIASES.get(key, (key, None))
    sct = codes.SCT
    types = {
        "liver": sct.Liver, "spleen": sct.Spleen, "kidney": sct.Kidney, "pancreas": sct.Pancreas,
        "bone": sct.Bone, "urinary_bladder": sct.Bladder, "lung": sct.Lung, "heart": sct.Heart,
        # 113276009 "Intestinal structure" is not in pydicom's dictionary (CID 7154 "Intestine")
        "bowel": Code("113276009", "SCT", "Intestine"),
        "stomach": sct.Stomach, "gallbladder": sct.Gallbladder, "aorta": sct.Aorta,
    }
    lat = {"right": sct.Right, "left": sct.Left, None: None}[side]
    if base == "lesion":
        return sct.MorphologicallyAbnormalStructure, sct.Lesion, lat, True
    if base in types:
        return sct.AnatomicalStructure, types[base], lat, True
    return sct.Tissue, sct.Tissue, None, False


def _colour(name: str, class_id: int):
    import highdicom as hd

    key = _norm(name)
    base = _ALIASES.get(key, (key, None))[0]
    if base in _ORGAN_RGB:
        r, g, b = _ORGAN_RGB[base]
    else:
        r, g, b = (round(v * 255) for v in _PALETTE[(class_id - 1) % len(_PALETTE)])
    return hd.color.CIELabColor.from_rgb(r, g, b)  # RGB 0-255


def segment_classes(path: str | os.PathLike, class_names) -> dict[int, int]:
    """SegmentNumber -> class id of a SEG written here (by SegmentLabel = class name), for
    :func:`napari_genseg.io.seg_reference.read_seg_labels` ``segments=``."""
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    names = [str(n) for n in class_names]
    return {int(s.SegmentNumber): names.index(str(s.SegmentLabel)) for s in ds.SegmentSequence
            if str(s.SegmentLabel) in names}


def _source_headers(like: Volume) -> list:
    """[(path, dataset without pixels)] of the source series' image objects (one per SOP instance)."""
    from .dicom import read_headers
    from .dicom_frames import is_image_object

    files = like.meta.get("files_in_order")
    if files:
        paths = list(dict.fromkeys(re.sub(r"#\d+$", "", str(f)) for f in files))
        headers = read_headers(paths)
    else:
        from .discovery import discover

        if not like.source_path:
            raise MaskWriteError("DICOM SEG needs the source DICOM files; this image has no source path")
        try:
            case = discover(like.source_path).single(Path(like.source_path).name)
        except InputError as exc:
            raise MaskWriteError(f"DICOM SEG: cannot read the source series again ({exc})") from None
        headers = case.headers if case.headers is not None else read_headers(case.files or ())
    uid = like.meta.get("series_uid")
    seen, out = set(), []
    for p, ds in headers:
        if not is_image_object(ds) or (uid and str(ds.get("SeriesInstanceUID", "")) != uid):
            continue
        sop = str(ds.get("SOPInstanceUID", ""))
        if sop in seen:
            continue
        seen.add(sop)
        out.append((p, ds))
    if not out:
        raise MaskWriteError(f"DICOM SEG: the source series {uid} is no longer under {like.source_path}")
    return out


#: Type 2 attributes highdicom copies from the source (empty when a source lacks them)
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(ds):
    """A shallow copy of ``ds`` with the Type 2 patient/study attributes present (empty if absent)."""
    import copy

    out = copy.copy(ds)
    if "SpecificCharacterSet" in out and not str(out.SpecificCharacterSet or "").strip():
        del out.SpecificCharacterSet  # an empty value is the default repertoire; highdicom refuses ''
    for key in _TYPE2:
        if key not in out:
            setattr(out, key, "")
    return out


def _frame_slots(headers, like: Volume):
    """For each source dataset, the stored slot k of each of its frames (None: not in the volume)."""
    from .dicom_frames import frames_of

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(like.source_affine, float)
    inv = np.linalg.inv(lps)
    row_cos = lps[:3, 0] / np.linalg.norm(lps[:3, 0])
    col_cos = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    ni, nj, nk = like.source_shape
    result, used = [], {}
    for p, ds in headers:
        slots = []
        for f in frames_of(Path(p), ds):
            k = None
            if (f.position is not None and f.orientation is not None and (f.cols, f.rows) == (ni, nj)
                    and np.allclose(f.orientation[:3], row_cos, atol=1e-3)
                    and np.allclose(f.orientation[3:], col_cos, atol=1e-3)):
                ijk = inv @ np.r_[f.position, 1.0]
                kk = int(np.rint(ijk[2]))
                if abs(ijk[0]) < 0.5 and abs(ijk[1]) < 0.5 and abs(ijk[2] - kk) < 0.5 and 0 <= kk < nk:
                    if kk in used:
                        raise MaskWriteError(f"DICOM SEG: {f.label} and {used[kk]} both lie at slice {kk}")
                    used[kk] = f.label
                    k = kk
            slots.append(k)
        result.append(slots)
    return result


def write_dicom_seg(path: str | os.PathLike, labels: np.ndarray, like: Volume, class_names, *,
                    algorithm: dict | None = None, edited_classes=(), record: dict | None = None,
                    atomic: bool = True) -> Path:
    """Write a ``(z, y, x)`` label mask on ``like``'s display grid as a DICOM SEG of its source series.

    Args:
        path: output file (``.dcm``); never one of the source files.
        labels: integer class ids (0 = background) of ``like``'s shape.
        like: the Volume read from a DICOM series (``meta["format"] == "dicom"``).
        class_names: name per class id (index 0 = background); segment labels and SNOMED codes
            (:func:`class_codes`).
        algorithm: ``{"name", "version", "checkpoint_sha256"}`` (any may be missing) of the model.
        edited_classes: class ids (or names) the user edited: SEMIAUTOMATIC, the others AUTOMATIC.
        record: the run record for the JSON sidecar (``x.dcm`` -> ``x.json``, as for NIfTI masks).
        atomic: write to a temporary file and rename (False: write in place).

    Returns the path written. Raises :class:`InputError` (one line) for a non-DICOM source
    ("DICOM SEG needs a DICOM source") and :class:`MaskWriteError` for a bad name/folder, labels
    of another shape or not integer, an empty mask, source files that can no longer be read, or
    a source without FrameOfReferenceUID.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from .sidecar import check_sidecar_free, package_version, write_output_sidecar

    path = Path(path)
    if like is None or like.meta.get("format") != "dicom" or like.source_affine is None:
        raise InputError("DICOM SEG needs a DICOM source")
    if not is_dicom_seg_path(path):
        raise MaskWriteError(f"{path.name}: a DICOM SEG output must end with .dcm")
    check_sidecar_free(path)
    labels = checked_mask_labels(path, labels, like)
    names = [str(n) for n in class_names]
    present = [int(c) for c in np.unique(labels) if int(c) != 0]
    if not present:
        raise MaskWriteError("the mask is empty: a DICOM SEG needs at least one segment")
    unnamed = [c for c in present if c >= len(names)]
    if unnamed:
        raise MaskWriteError(f"label ids {unnamed} have no class name (classes: {', '.join(names)})")
    edited = {names.index(e) if isinstance(e, str) and e in names else e for e in edited_classes}

    headers = _source_headers(like)
    for p, _ in headers:
        if same_file(path, p):
            raise MaskWriteError(f"refusing to overwrite the source image {path}")
    slots = _frame_slots(headers, like)
    seg_no = {c: i + 1 for i, c in enumerate(present)}
    lut = np.zeros(max(present) + 1, np.uint8 if len(present) < 256 else np.uint16)
    for c, s in seg_no.items():
        lut[c] = s
    small = np.uint8 if max(present) < 256 else np.uint16 if max(present) < 65536 else None
    if small is None:
        raise MaskWriteError(f"label id {max(present)} does not fit uint16")
    stored = labels_to_stored(labels.astype(small, copy=False), like, small)  # (i=col, j=row, k)
    multi = [i for i, (_, ds) in enumerate(headers) if int(ds.get("NumberOfFrames", 1) or 1) > 1
             or "PerFrameFunctionalGroupsSequence" in ds]
    if multi:
        if len(headers) > 1:
            raise MaskWriteError("DICOM SEG: a series of several multi-frame files is not supported")
        sources = [headers[0][1]]
        frame_slots = slots[0]
    else:
        keep = [i for i, s in enumerate(slots) if s[0] is not None]
        if not keep:
            raise MaskWriteError("DICOM SEG: no source image lies on the volume's slices")
        sources = [headers[i][1] for i in keep]
        frame_slots = [slots[i][0] for i in keep]
    if not str(sources[0].get("FrameOfReferenceUID", "") or "").strip():
        raise MaskWriteError("DICOM SEG: the source images have no FrameOfReferenceUID (0020,0052), which a "
                             "SEG must share with them; save the mask as NIfTI instead")
    sources = [_with_type2(ds) for ds in sources]
    ni, nj, _ = like.source_shape
    pix = np.zeros((len(frame_slots), nj, ni), lut.dtype)
    for f, k in enumerate(frame_slots):
        if k is not None:
            pix[f] = lut[stored[:, :, k].T]

    alg = dict(algorithm or {})
    params = {"checkpoint_sha256": str(alg["checkpoint_sha256"])} if alg.get("checkpoint_sha256") else None
    ident = hd.AlgorithmIdentificationSequence(
        name=str(alg.get("name") or "napari-genseg"), family=codes.DCM.ArtificialIntelligence,
        version=str(alg.get("version") or package_version()), source="napari-genseg", parameters=params)
    descriptions = []
    for c in present:
        category, ptype, lat, _known = class_codes(names[c])
        kind = (hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if c in edited
                else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC)
        d = hd.seg.SegmentDescription(
            segment_number=seg_no[c], segment_label=names[c][:64], segmented_property_category=category,
            segmented_property_type=ptype, algorithm_type=kind, algorithm_identification=ident,
            tracking_id=names[c][:64], tracking_uid=generate_uid(),
            display_color=_colour(names[c], c))
        if lat is not None:
            d.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(lat)]
        if _norm(names[c]).startswith("liver_") and ptype == codes.SCT.Lesion:  # liver_lesion/_tumor
            d.AnatomicRegionSequence = [hd.sr.CodedConcept.from_code(codes.SCT.Liver)]
        descriptions.append(d)
    first = sources[0]
    src_no = first.get("SeriesNumber")
    series_number = int(src_no) + 1000 if src_no not in (None, "") else SEG_SERIES_NUMBER
    try:
        with warnings.catch_warnings():
            # highdicom's note on one-component PatientName values copied from the source
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
            seg = hd.seg.Segmentation(
                source_images=sources, pixel_array=pix, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=series_number,
                sop_instance_uid=generate_uid(), instance_number=1, manufacturer="napari-genseg",
                manufacturer_model_name=str(alg.get("name") or "napari-genseg")[:64],
                software_versions=package_version(), device_serial_number="0",
                content_label="GENSEG", content_description="napari-genseg segmentation"[:64],
                series_description=f"SEG {str(first.get('SeriesDescription') or '')}".strip()[:64],
                omit_empty_frames=True,
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise MaskWriteError(f"DICOM SEG: highdicom refused the source series ({exc})") from None
    if atomic:
        with atomic_path(path) as tmp:
            seg.save_as(tmp)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(path)
    write_output_sidecar(path, like, record)
    return path
