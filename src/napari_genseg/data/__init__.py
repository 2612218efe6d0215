"""Sample data shipped inside the package (see ``NOTICE.md`` here for source and licence).

``SAMPLE_CT``: the 112-slice real abdomen CT "Abdominal CT (real)" (TotalSegmentator test data,
Apache-2.0, hips to upper abdomen, 3 mm isotropic; slices 82..111 are the labelled
``ct_abdomen_small``). Read it with :func:`sample_ct`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLE_CT", "SAMPLE_CT_NAME", "SAMPLE_CT_DESCRIPTION", "sample_ct_path", "sample_ct"]

#: file name of the real sample CT inside this package
SAMPLE_CT = "ct_thorax_abdomen_unlabeled.nii.gz"
#: the name napari and the demo show for it
SAMPLE_CT_NAME = "Abdominal CT (real)"
#: one paragraph for users (layer metadata, README, demo output)
SAMPLE_CT_DESCRIPTION = (
    "Real abdominal CT, 112 axial slices of 3 mm from the hips (hip prosthesis) to the upper abdomen, "
    "ending inside the liver (no thorax despite the file name). TotalSegmentator test data, Apache-2.0 "
    "(napari_genseg/data/NOTICE.md). Slices 82..111 are voxel for voxel the labelled ct_abdomen_small "
    "used for the model cards' real-data numbers, so results there are not independent of them. No labels."
)


def sample_ct_path() -> Path:
    """Path of the shipped sample CT (a plain file in wheel and editable installs alike).

    Raises FileNotFoundError when the package was installed without its data (a broken build).
    """
    path = Path(__file__).resolve().parent / SAMPLE_CT
    if not path.is_file():
        raise FileNotFoundError(f"the sample CT {SAMPLE_CT} is missing from {path.parent}: reinstall napari-genseg")
    return path


def sample_ct():
    """The sample CT as a display-convention :class:`~napari_genseg.volume.Volume` (HU, (z, y, x),
    spacing (3, 3, 3) mm), read by the package's NIfTI reader like any user file."""
    from ..io import load_volume

    return load_volume(sample_ct_path())
