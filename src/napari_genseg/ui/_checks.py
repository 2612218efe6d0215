"""Input checks in the dock widgets: run them before a model starts and show each warning as a
napari notification (the checks themselves live in ``napari_genseg.checks``)."""

from __future__ import annotations

__all__ = ["checked_volume"]


def _notify(msg: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(msg)


def checked_volume(vol, ckpt, hu_offset: float = 0.0):
    """(volume the model sees, InputCheckReport): ``hu_offset`` added to the voxels, the HU and
    body-region checks run, one napari warning notification per finding (with the offset to set
    in the dock's "HU offset" field when one is suggested)."""
    from ..checks import apply_hu_offset, check_input

    if hu_offset:
        vol = apply_hu_offset(vol, hu_offset)
    report = check_input(vol, ckpt.body_region, applied_offset=hu_offset)
    for w in report.warnings:
        if report.suggested_offset is not None and w == report.hu.message:
            w += f": set 'HU offset' to {hu_offset + report.suggested_offset:g} in the Segment dock"
        _notify(w)
    return vol, report
