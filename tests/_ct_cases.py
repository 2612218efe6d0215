"""CT cases for tests (tests only): the shared real CT with labels, or the phantom without it.

``GENSEG_SHARED_DIR`` points at another shared folder; a missing one behaves like a clone without
``../shared``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``GENSEG_SHARED_DIR`` or ``../shared`` beside the checkout (read at each call)."""
    return Path(os.environ.get("GENSEG_SHARED_DIR") or REPO.parent / "shared")


def real_data_dir() -> Path:
    return shared_dir() / "data" / "real"


@dataclass(frozen=True)
class CtCase:
    """A CT NIfTI with reference labels on the same voxels (both as stored, (x, y, z))."""

    path: Path
    labels: Path
    liver_ids: tuple[int, ...]  # label ids that make up the liver
    source: str  # "real" (../shared) or "phantom"


def write_phantom_case(folder: Path) -> CtCase:
    """The phantom (seed 0) as NIfTI CT + labels in ``folder`` (liver = liver + its lesions)."""
    import nibabel as nib
    import numpy as np

    from napari_genseg.phantom import LESION, LIVER, make_phantom

    ph = make_phantom(seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    ct, lab = folder / "phantom_ct.nii.gz", folder / "phantom_labels.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(ph.image, (2, 1, 0)), ph.affine), str(ct))
    nib.save(nib.Nifti1Image(np.transpose(ph.labels, (2, 1, 0)), ph.affine), str(lab))
    return CtCase(ct, lab, (LIVER, LESION), "phantom")


def find_ct_case(scratch: Path) -> CtCase:
    """The shared real abdomen CT with its labels when present, else the phantom written to
    ``scratch``."""
    real = real_data_dir() / "ct-abdomen"
    ct, lab = real / "ct_abdomen_small.nii.gz", real / "ct_abdomen_small_labels.nii.gz"
    if ct.is_file() and lab.is_file():
        return CtCase(ct, lab, (5,), "real")  # TotalSegmentator id 5 = liver
    return write_phantom_case(scratch)
