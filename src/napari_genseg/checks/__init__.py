"""Input checks before any model runs: is this a CT in HU, and does it show the body region the
checkpoint was trained on? (numpy/scipy only: no torch, no napari.)

``check_input`` runs both checks on a :class:`~napari_genseg.volume.Volume` and returns an
:class:`InputCheckReport` whose ``warnings`` are one line each (printed by the CLI, shown as napari
notifications by the Segment dock, written into every output's JSON sidecar). The checks warn; they
never refuse: a radiologist may know better. ``apply_hu_offset`` adds a constant to the voxels
(``--hu-offset``; the suggested one with "auto").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import InputError
from .body_region import REGIONS, RegionCheck, check_body_region, region_for_classes, slice_regions
from .hu import HUCheck, check_hu, dicom_intensity_facts

__all__ = [
    "InputCheckReport",
    "check_input",
    "apply_hu_offset",
    "parse_hu_offset",
    "HUCheck",
    "RegionCheck",
    "check_hu",
    "check_body_region",
    "dicom_intensity_facts",
    "region_for_classes",
    "slice_regions",
    "REGIONS",
]


@dataclass
class InputCheckReport:
    """``hu``: the HU check of the data as given (after ``hu_offset``); ``region``: the body-region
    check (None when skipped, e.g. intensities that are not HU and have no suggested offset);
    ``hu_offset``: HU that were added to the voxels before the checks (and the model);
    ``warnings``: one line each; ``notes``: facts that are not warnings."""

    hu: HUCheck
    region: RegionCheck | None
    hu_offset: float = 0.0
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def suggested_offset(self) -> float | None:
        return self.hu.suggested_offset

    def to_dict(self) -> dict:
        return {
            "hu_offset": self.hu_offset,
            "hu": self.hu.to_dict(),
            "body_region": self.region.to_dict() if self.region is not None else None,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


def parse_hu_offset(value) -> float | str | None:
    """``--hu-offset`` value: None, "auto", or a number of HU (float). Raises InputError."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    s = str(value).strip().lower()
    if s == "auto":
        return "auto"
    try:
        out = float(s)
    except ValueError:
        raise InputError(f"--hu-offset must be a number of HU or 'auto', not {value!r}") from None
    if not np.isfinite(out):
        raise InputError(f"--hu-offset must be finite, not {value!r}")
    return out


def apply_hu_offset(vol, offset: float):
    """A copy of ``vol`` with ``offset`` HU added to every voxel (float32 unless the sum stays an
    exact int16); geometry unchanged; ``meta["hu_offset"]`` records it. ``offset`` 0 -> ``vol``.
    Memory: the result is the only new array (no int32/float64 intermediate of the volume's size)."""
    if not offset:
        return vol
    data = np.asarray(vol.data)
    # one new array of the output's size, no wider temporary (a full-size CT is 150 MB in int16)
    if data.dtype.kind in "iu" and float(offset).is_integer() and data.size:
        lo, hi = int(data.min()) + int(offset), int(data.max()) + int(offset)
        if -32768 <= lo and hi <= 32767:
            out = np.empty(data.shape, np.int16)
            np.add(data, np.int64(offset), out=out, casting="unsafe")  # exact: the range was checked
        else:
            out = data.astype(np.float32)
            out += np.float32(offset)
    else:
        out = data.astype(np.float32)  # a copy also for float32 input: ``vol`` stays untouched
        out += np.float32(offset)
    meta = dict(vol.meta)
    meta["hu_offset"] = float(offset)
    return replace(vol, data=out, meta=meta)


def check_input(vol, body_region: str | list | None = None, applied_offset: float = 0.0) -> InputCheckReport:
    """Run the HU check and the body-region check on ``vol``; ``applied_offset``: HU already added
    to its voxels (``apply_hu_offset``), recorded in the report.

    ``body_region``: the checkpoint's region ("abdomen", "thorax", "head", a list of them: the
    volume must show one; None: not checked). When the intensities are not HU but an offset is
    suggested, the body region is judged on the shifted voxels (and says so); without a suggestion
    it is skipped. Returns an :class:`InputCheckReport`; never raises for odd data.
    """
    data = np.asarray(vol.data)
    hu = check_hu(data, dicom_intensity_facts(vol))
    warnings: list[str] = []
    notes: list[str] = []
    if applied_offset:
        notes.append(f"{applied_offset:+g} HU added to every voxel before the checks and the model")
    if not hu.ok:
        warnings.append(hu.message)
    region = None
    expected = body_region if isinstance(body_region, (list, tuple)) else ([body_region] if body_region else [])
    expected = [r for r in expected if r]
    unknown = [r for r in expected if r not in REGIONS]
    if unknown:
        notes.append(f"body region {unknown[0]!r} has no rule: not checked")
        expected = [r for r in expected if r in REGIONS]
    if expected:
        extra = 0.0
        if not hu.ok:
            extra = hu.suggested_offset
        if extra is None:
            notes.append("body region not checked: the intensities are not HU")
        else:
            checks = [check_body_region(data, vol.spacing, r, extra) for r in expected]
            region = next((c for c in checks if c.ok), checks[0])
            if not region.ok:
                msg = region.message
                if extra:
                    msg += f" (judged with the suggested {extra:+g} HU)"
                if len(expected) > 1:
                    msg = msg.replace(f"the {expected[0]}", "the " + " or ".join(expected), 1)
                warnings.append(msg)
    return InputCheckReport(hu=hu, region=region, hu_offset=float(applied_offset), warnings=warnings, notes=notes)
