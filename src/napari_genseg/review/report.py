"""What the Review dock's metrics table shows, and its CSV (pure numpy/scipy).

* against a reference mask: per class present in either, Dice, IoU and HD95 in mm for the volume
  (``metrics.case_metrics``, medpy HD95, a class absent from both is left out; a class in only
  one of them scores 0 / 0 / nan);
* without one: per class present, volume in mL (voxel count × voxel volume) and the image's mean
  and standard deviation (population, ddof 0) in HU inside the mask.

Both also per slice along an axis (:func:`slice_metrics`, :func:`slice_stats`): on each slice,
per class present there in either mask, 2-D Dice / IoU and a 2-D HD95 in mm (in-plane spacing),
with the same rules; the stats give the slice's share of the volume (mL) and its HU. The CSV
(:func:`metric_csv_rows`) holds the volume rows (``scope`` "volume") and then every slice's rows
(``scope`` "slice", ``axis``, ``slice`` index).
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

__all__ = ["class_name", "volume_metrics", "volume_stats", "slice_metrics", "slice_stats", "metric_csv_rows",
           "write_csv", "METRIC_COLUMNS", "STAT_COLUMNS", "CSV_SCOPE_COLUMNS"]

METRIC_COLUMNS = ("class", "dice", "iou", "hd95_mm")
STAT_COLUMNS = ("class", "volume_ml", "hu_mean", "hu_sd", "voxels")
#: columns the CSV puts after "class": whole volume or one slice (its axis and index)
CSV_SCOPE_COLUMNS = ("scope", "axis", "slice")


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


def _slice_indices(n: int, slices) -> list[int]:
    if slices is None:
        return list(range(n))
    out = sorted({int(i) for i in np.atleast_1d(slices)})
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"slice {bad[0]} is outside 0..{n - 1}")
    return out


def _in_plane(spacing, axis: int) -> tuple[float, float]:
    sp = [float(s) for s in spacing]
    return tuple(sp[i] for i in range(3) if i != axis % 3)


def slice_metrics(mask: np.ndarray, reference: np.ndarray, spacing, class_names=None, axis: int = 0,
                  slices=None) -> dict[int, list[dict]]:
    """Per slice along ``axis`` (all, or the indices in ``slices``): ``{slice: rows}`` with rows
    ``{"class", "dice", "iou", "hd95_mm"}`` as :func:`volume_metrics` gives them, computed in 2-D
    on that slice (HD95 in mm from the in-plane spacing) for the classes present on it in either
    volume; a slice where neither has a class maps to ``[]``. Both (Z, H, W), spacing (sz, sy, sx)
    mm. Raises ``ValueError`` for shapes that differ or a slice outside the volume."""
    mask, reference = np.asarray(mask), np.asarray(reference)
    if mask.shape != reference.shape or mask.ndim != 3:
        raise ValueError(f"mask {mask.shape} and reference {reference.shape} must be 3-D of one shape")
    m, r = np.moveaxis(mask, axis % 3, 0), np.moveaxis(reference, axis % 3, 0)
    sp = _in_plane(spacing, axis)
    out = {}
    for i in _slice_indices(m.shape[0], slices):
        out[i] = volume_metrics(m[i], r[i], sp, class_names) if (m[i].any() or r[i].any()) else []
    return out


def slice_stats(mask: np.ndarray, image: np.ndarray, spacing, class_names=None, axis: int = 0,
                slices=None) -> dict[int, list[dict]]:
    """Per slice along ``axis``: ``{slice: rows}`` of :func:`volume_stats` on that slice (its
    volume in mL: voxels × voxel volume, HU mean / SD inside the mask). Raises ``ValueError`` for
    shapes that differ or a slice outside the volume."""
    mask, image = np.asarray(mask), np.asarray(image)
    if mask.shape != image.shape or mask.ndim != 3:
        raise ValueError(f"mask {mask.shape} and image {image.shape} must be 3-D of one shape")
    m, im = np.moveaxis(mask, axis % 3, 0), np.moveaxis(image, axis % 3, 0)
    out = {}
    for i in _slice_indices(m.shape[0], slices):
        out[i] = volume_stats(m[i : i + 1], im[i : i + 1], spacing, class_names) if m[i].any() else []
    return out


def metric_csv_rows(volume_rows: list[dict], per_slice: dict[int, list[dict]], axis: int = 0) -> list[dict]:
    """The CSV's rows: the volume rows (scope "volume") then each slice's rows in slice order
    (scope "slice", ``axis``, ``slice`` index)."""
    rows = [{**r, "scope": "volume", "axis": "", "slice": ""} for r in volume_rows]
    for i in sorted(per_slice):
        rows += [{**r, "scope": "slice", "axis": int(axis), "slice": int(i)} for r in per_slice[i]]
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
