"""What the Review dock's metrics table shows, and its CSV (pure numpy/scipy).

* against a reference mask: per class present in either, Dice, IoU and HD95 in mm for the volume
  (``metrics.case_metrics``, medpy HD95, a class absent from both is left out; a class in only
  one of them scores 0 / 0 / nan);
* without one: per class present, volume in mL (voxel count × voxel volume) and the image's mean
  and standard deviation (population, ddof 0) in HU inside the mask.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_path
from ..metrics import case_metrics

__all__ = ["class_name", "volume_metrics", "volume_stats", "write_csv", "METRIC_COLUMNS", "STAT_COLUMNS"]

METRIC_COLUMNS = ("class", "dice", "iou", "hd95_mm")
STAT_COLUMNS = ("class", "volume_ml", "hu_mean", "hu_sd", "voxels")


def class_name(cid: int, class_names: Sequence[str] | None) -> str:
    """The name of label id ``cid`` (``"label N"`` when unnamed)."""
    return class_names[cid] if class_names is not None and 0 <= cid < len(class_names) else f"label {cid}"


def _ids(*arrays) -> list[int]:
    ids = set()
    for a in arrays:
        ids |= {int(v) for v in np.unique(a)}
    return sorted(i for i in ids if i != 0)


def volume_metrics(mask: np.ndarray, reference: np.ndarray, spacing, class_names=None) -> list[dict]:
    """Rows ``{"class", "dice", "iou", "hd95_mm"}`` per class present in ``mask`` or
    ``reference`` (both (Z, H, W), spacing (sz, sy, sx) mm). Raises ``ValueError`` for shapes
    that differ."""
    mask, reference = np.asarray(mask), np.asarray(reference)
    if mask.shape != reference.shape:
        raise ValueError(f"mask {mask.shape} and reference {reference.shape} differ in shape")
    rows = []
    for c in _ids(mask, reference):
        p, r = mask == c, reference == c
        m = case_metrics(p, r, spacing)
        if not p.any() or not r.any():  # only one of them has the class: no distance to report
            m = {"dice": 0.0, "iou": 0.0, "hd95_mm": float("nan")}
        rows.append({"class": class_name(c, class_names), **m})
    return rows


def volume_stats(mask: np.ndarray, image: np.ndarray, spacing, class_names=None) -> list[dict]:
    """Rows ``{"class", "volume_ml", "hu_mean", "hu_sd", "voxels"}`` per class present in
    ``mask`` (image in HU, same shape; spacing (sz, sy, sx) mm)."""
    mask, image = np.asarray(mask), np.asarray(image)
    if mask.shape != image.shape:
        raise ValueError(f"mask {mask.shape} and image {image.shape} differ in shape")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    rows = []
    for c in _ids(mask):
        vals = image[mask == c].astype(np.float64)
        rows.append({"class": class_name(c, class_names), "volume_ml": vals.size * voxel_ml,
                     "hu_mean": float(vals.mean()), "hu_sd": float(vals.std()), "voxels": int(vals.size)})
    return rows


def write_csv(path: str | os.PathLike, rows: list[dict], columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV (header = ``columns`` or the first row's keys) atomically; nan -> empty."""
    columns = list(columns or (rows[0].keys() if rows else ()))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        out = []
        for k in columns:
            v = r.get(k, "")
            if isinstance(v, float):
                v = "" if not np.isfinite(v) else f"{v:.6g}"
            out.append(v)
        w.writerow(out)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path
