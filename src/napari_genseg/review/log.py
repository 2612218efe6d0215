"""The Review dock's Save: the mask as NIfTI on the source geometry plus ``<name>.review.json``.

``<name>.review.json`` (beside ``<name>.nii.gz``, atomic) records who reviewed (the reader name
setting), the model run (family, config, checkpoint path and SHA-256, precision, backend: the
``run_record`` the Segment dock stored in the layer), the uncertainty run (TTA views or AR-Seg
samples), per-slice status and edit counts with timestamps, and the metric rows shown in the
dock. The mask itself is written by ``io.write_mask`` (which also writes its usual sidecar).
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from ..io import write_mask
from ..io.sidecar import package_version, write_sidecar

__all__ = ["REVIEW_FORMAT", "review_log_path", "review_record", "save_review"]

REVIEW_FORMAT = "napari-genseg-review"


def review_log_path(mask_path: str | os.PathLike) -> Path:
    """``x.nii.gz`` / ``x.nii`` -> ``x.review.json`` beside it."""
    p = Path(mask_path)
    for suf in (".nii.gz", ".nii"):
        if p.name.endswith(suf):
            return p.with_name(p.name[: -len(suf)] + ".review.json")
    return p.with_name(p.name + ".review.json")


def review_record(review: dict, *, reader: str = "", run: dict | None = None, uncertainty: dict | None = None,
                  metrics: dict | None = None, class_names=None, image_key: str | None = None,
                  reference: str | None = None) -> dict:
    """The review log's content. ``review``: ``ReviewState.to_dict()``; ``run``: the layer's run
    record (``run_record.RUN_KEY``: model + inference); ``metrics``: ``{"kind": "reference" |
    "stats", "rows": [...]}``."""
    run = run or {}
    status = review.get("status", [])
    return {
        "reader": reader,
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package": {"name": "napari-genseg", "version": package_version()},
        "image_sha256": image_key,
        "model": run.get("model"),
        "inference": run.get("inference"),
        "uncertainty": uncertainty,
        "class_names": list(class_names) if class_names is not None else None,
        "reference_layer": reference,
        "review": {
            "axis": review.get("axis", 0),
            "started": review.get("started"),
            "counts": {s: status.count(s) for s in ("untouched", "accepted", "edited", "flagged")},
            "slices": [{"index": i, "status": s, "edits": review["edits"][i],
                        "changed": review.get("changed", {}).get(str(i))}
                       for i, s in enumerate(status) if s != "untouched" or review["edits"][i]],
        },
        "metrics": metrics,
    }


def save_review(path: str | os.PathLike, mask, like=None, spacing=None, origin=None, run: dict | None = None,
                record: dict | None = None) -> tuple[Path, Path]:
    """Write ``mask`` to ``path`` (NIfTI on ``like``'s source geometry, ``io.write_mask``; its
    sidecar carries ``run`` and the review note) and the review log ``record`` beside it.
    Returns (mask path, log path). Raises ``MaskWriteError`` (an InputError) as ``write_mask`` does."""
    run = dict(run or {})
    run["written_by"] = "Review dock: the reviewed mask (edits included); see the .review.json beside it"
    out = write_mask(path, mask, like=like, spacing=spacing, origin=origin, record=run)
    log = write_sidecar(review_log_path(out), {**(record or {}), "format": REVIEW_FORMAT,
                                               "mask": str(out)})
    return out, log
