"""Back to training: a reviewed image + mask as one case of a Decathlon-layout folder.

``add_training_case(folder, image, mask, spacing, origin, class_names)`` writes
``imagesTr/<case>.nii.gz``, ``labelsTr/<case>.nii.gz`` and updates ``dataset.json`` (``labels``,
``modality``, ``numTraining``, ``training`` list), which ``genseg train --data msd:FOLDER`` reads
(``training.data.msd_pairs``). Both files are on the display grid of the image (LPS voxel axes,
the RAS affine of ``Volume.display_affine_ras``), so image and label share one geometry.

* Never duplicated: the case is named by the image's content hash (``autosave.image_key``); adding
  the same image again replaces its label (a corrected correction) instead of adding a case.
* Patient data: with ``strip_identifiers`` (default) nothing but voxels and geometry leaves the
  layer: a fresh NIfTI header (no description, no file name, no DICOM tags), the case named by
  the hash, not the file. Without it the case is named after ``name``. The result says what was
  kept and what was dropped, and ``dataset.json`` records it per case under ``genseg_cases``.
* All writes are atomic (``io/atomic.py``). A folder whose ``dataset.json`` has other class
  labels is refused (``TrainingExportError``, an InputError): one folder, one class map.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import atomic_path
from ..volume import Volume
from .autosave import image_key

__all__ = ["TrainingExportError", "add_training_case", "KEPT", "DROPPED"]

KEPT = ["voxel values (HU)", "corrected mask", "voxel spacing (mm)", "orientation and origin"]
DROPPED = ["patient name", "patient ID", "dates and times", "institution", "DICOM tags", "source file name"]


class TrainingExportError(InputError, ValueError):
    """A training folder the case cannot be added to (other class labels, unreadable dataset.json)."""


def _save_nifti(path: Path, data_zyx: np.ndarray, affine: np.ndarray, dtype) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(np.transpose(data_zyx, (2, 1, 0))).astype(dtype), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _image_dtype(image: np.ndarray):
    if np.issubdtype(image.dtype, np.integer) and image.min(initial=0) >= -32768 and image.max(initial=0) <= 32767:
        return np.int16
    return np.float32


def add_training_case(folder: str | os.PathLike, image: np.ndarray, mask: np.ndarray, spacing, origin=(0.0, 0.0, 0.0),
                      class_names=None, name: str = "", strip_identifiers: bool = True) -> dict:
    """Add (or update) one case; returns ``{"case", "image", "label", "replaced", "kept",
    "dropped", "dataset"}``. image, mask: (z, y, x) on the same grid; spacing (sz, sy, sx) mm;
    origin (z, y, x) LPS mm. Raises ``TrainingExportError`` for shapes that differ, a mask that is
    not a non-negative integer volume, or a folder with other class labels."""
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim != 3 or image.shape != mask.shape:
        raise TrainingExportError(f"image {image.shape} and mask {mask.shape} must be the same 3-D grid")
    if mask.dtype.kind not in "iub" or (mask.size and mask.min() < 0):
        raise TrainingExportError("the mask must hold non-negative integer labels")
    folder = Path(folder)
    ds_path = folder / "dataset.json"
    labels = {str(i): str(n) for i, n in enumerate(class_names or [])} or {"0": "background"}
    if ds_path.is_file():
        try:
            ds = json.loads(ds_path.read_text())
        except (OSError, ValueError) as exc:
            raise TrainingExportError(f"{ds_path}: not a readable dataset.json ({exc})") from None
        if class_names and ds.get("labels") and ds["labels"] != labels:
            raise TrainingExportError(f"{ds_path} has the labels {ds['labels']}, this mask {labels}: "
                                      "use another training folder")
    else:
        ds = {"name": folder.name, "description": "cases reviewed with napari-genseg", "tensorImageSize": "3D",
              "modality": {"0": "CT"}, "labels": labels, "training": [], "test": []}
    key = image_key(image, spacing)
    if strip_identifiers or not name:
        case = f"genseg_{key[:12]}"
    else:
        case = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or f"genseg_{key[:12]}"
    img_rel, lbl_rel = f"./imagesTr/{case}.nii.gz", f"./labelsTr/{case}.nii.gz"
    cases = ds.setdefault("genseg_cases", {})
    # never duplicated: the same voxels already exported (under any name) are replaced
    for old, rec in list(cases.items()):
        if rec.get("image_sha256") == key and old != case:
            ds["training"] = [t for t in ds.get("training", []) if Path(t.get("image", "")).name != f"{old}.nii.gz"]
            cases.pop(old)
    replaced = any(Path(t.get("image", "")).name == f"{case}.nii.gz" for t in ds.get("training", []))
    affine = Volume(mask, spacing=spacing, origin=origin).display_affine_ras
    _save_nifti(folder / "imagesTr" / f"{case}.nii.gz", image, affine, _image_dtype(image))
    _save_nifti(folder / "labelsTr" / f"{case}.nii.gz", mask, affine, np.uint8 if mask.max(initial=0) < 256 else np.uint16)
    if not replaced:
        ds.setdefault("training", []).append({"image": img_rel, "label": lbl_rel})
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    prev = cases.get(case, {})
    cases[case] = {"image_sha256": key, "added": prev.get("added", now), "updated": now,
                   "kept": KEPT, "dropped": DROPPED if strip_identifiers else ["DICOM tags"],
                   "strip_identifiers": bool(strip_identifiers)}
    ds["numTraining"] = len(ds["training"])
    with atomic_path(ds_path) as tmp:
        tmp.write_text(json.dumps(ds, indent=2) + "\n")
    return {"case": case, "image": folder / img_rel, "label": folder / lbl_rel, "replaced": replaced,
            "kept": KEPT, "dropped": cases[case]["dropped"], "dataset": ds_path}
