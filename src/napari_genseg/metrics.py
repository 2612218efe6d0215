"""Segmentation metrics (pure numpy / scipy; no torch).

Overlap and surface metrics
---------------------------
``dice``, ``iou`` and ``hd95`` work on binary arrays of any dimensionality. ``hd95`` is in mm: the
surface-distance maps come from ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``.

Surface voxels are ``mask XOR binary_erosion(mask, face-connectivity)`` with voxels outside the
array counted as background (``border_value=0``), exactly as medpy's ``__surface_distances`` and
MONAI's ``get_mask_edges``.

Two HD95 conventions exist and differ on asymmetric errors:

* ``"medpy"`` (default; what the TransUNet / MSA2Net evaluation calls through
  ``medpy.metric.binary.hd95``): the 95th percentile of the *union* of both directed
  surface-distance sets, ``percentile(concat(d(P->R), d(R->P)), 95)``.
* ``"monai"`` (``monai.metrics.compute_hausdorff_distance(percentile=95, directed=False)``):
  the *maximum* of the two directed 95th percentiles,
  ``max(percentile(d(P->R), 95), percentile(d(R->P), 95))``; always >= the medpy value.

Percentiles use numpy's default linear interpolation (as both libraries do).

TransUNet per-case convention (spec ``msa2net.md`` "Evaluation", followed literally, which is also
what the official ``calculate_metric_percase`` does)::

    pred non-empty and ref non-empty -> Dice, HD95 computed
    pred non-empty and ref empty     -> Dice 1, HD95 0
    pred empty (whatever ref is)     -> Dice 0, HD95 0

Note the last line: with this convention a class absent from *both* prediction and reference
scores Dice 0. ``case_metrics(..., both_empty_dice=1.0)`` switches that single case to Dice 1
(IoU 1), which is what most other toolkits do. IoU follows the same table as Dice. Unlike the
official code (which reports HD95 in voxels), HD95 here is in mm using ``spacing``.

Multi-annotator metrics (spec ``arseg.md``, BerDiff evaluation code)
----------------------------------------------------------------------
``d(a, b) = 1 - IoU(a, b)`` and ``d = 0`` when both are empty; samples are binarised at ``> 0.5``
(annotations too, which is a no-op for 0/1 masks).

* ``generalized_energy_distance`` returns the per-image **squared** GED,
  ``GED^2 = 2 mean_{i,j} d(Y_i, S_j) - mean_{i,i'} d(Y_i, Y_i') - mean_{j,j'} d(S_j, S_j')``
  with the pair means including ``i = i'`` and ``j = j'``. No square root is taken anywhere: the
  dataset value is the mean of the per-image GED^2 (the number papers report as "GED").
* ``hm_iou``: annotations and samples are both cyclically repeated to ``L = max(A, N)``, the
  ``L x L`` matrix of ``d`` is matched with ``scipy.optimize.linear_sum_assignment`` and the mean of
  ``1 - d`` over matched pairs is returned. For ``A = 4, N = 16`` this is exactly the spec's
  "repeat the 4 annotations to 16" (the order of repetition does not change the assignment).
* ``soft_dice``: soft reference = mean of annotations, prediction = mean of the raw samples; for
  ``tau in (0.1, 0.3, 0.5, 0.7, 0.9)`` both are binarised at ``> tau`` and Dice is computed as in the
  official code, ``(2|P&R| + s) / (|P| + |R| + s)`` with ``s = 1e-6`` (so both-empty = 1); the mean
  over tau is returned.
* ``dataset_multiannotator_metrics`` averages the per-image values over **all** images (no
  180-image cap as in the BerDiff script); the value at ``N`` uses the first ``N`` samples.
* ``interrater_metrics``: the annotators' own values, leave-one-out: each annotator in turn is
  the single "sample" scored against the other ``A - 1`` with the same three functions, and the
  mean over annotators is returned (plus the mean pairwise IoU and Dice of distinct annotator
  pairs, both-empty = 1). This is how well one human predicts the others; a model's GED(N)
  against all ``A`` annotators is not the same quantity (more samples, one more reference) and
  is read beside it, not as a bound. (The "oracle" that returns the annotators themselves as
  samples scores GED 0 and HM-IoU 1 by construction, so it says nothing.)

Sources: GED as used for multi-annotator segmentation by Kohl et al., "A Probabilistic U-Net for
Segmentation of Ambiguous Images" (NeurIPS 2018) and Baumgartner et al., "PHiSeg" (MICCAI 2019);
HM-IoU and Soft-Dice as in the BerDiff / HiDiff evaluation (Chen et al. 2023) reused by AR-Seg
(Chen et al., MICCAI 2025, Sec. 3.2); conventions pinned in ``../shared/specs/arseg.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

__all__ = [
    "dice",
    "iou",
    "surface_distances",
    "hd95",
    "case_metrics",
    "evaluate_labels",
    "pairwise_iou_distance",
    "generalized_energy_distance",
    "ged",
    "hm_iou",
    "soft_dice",
    "dataset_multiannotator_metrics",
    "interrater_metrics",
    "SOFT_DICE_THRESHOLDS",
]

SOFT_DICE_THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)


# ----------------------------------------------------------------------------------------------
# overlap metrics
# ----------------------------------------------------------------------------------------------
def _as_bool(a) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == bool else a > 0


def dice(pred, ref, empty_value: float = 1.0) -> float:
    """Dice = 2|P & R| / (|P| + |R|) of two binary arrays (non-zero = foreground).

    ``empty_value`` is returned when both are empty (the TransUNet rules live in
    :func:`case_metrics`).
    """
    p, r = _as_bool(pred), _as_bool(ref)
    if p.shape != r.shape:
        raise ValueError(f"shape mismatch {p.shape} vs {r.shape}")
    sp, sr = int(np.count_nonzero(p)), int(np.count_nonzero(r))
    if sp + sr == 0:
        return float(empty_value)
    inter = int(np.count_nonzero(p & r))
    return 2.0 * inter / (sp + sr)


def iou(pred, ref, empty_value: float = 1.0) -> float:
    """IoU (Jaccard) = |P & R| / |P | R|; ``empty_value`` when both are empty."""
    p, r = _as_bool(pred), _as_bool(ref)
    if p.shape != r.shape:
        raise ValueError(f"shape mismatch {p.shape} vs {r.shape}")
    union = int(np.count_nonzero(p | r))
    if union == 0:
        return float(empty_value)
    return int(np.count_nonzero(p & r)) / union


# ----------------------------------------------------------------------------------------------
# surface distances / HD95
# ----------------------------------------------------------------------------------------------
def _spacing_tuple(spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if sp.size == 1:
        return (float(sp[0]),) * ndim
    if sp.size != ndim:
        raise ValueError(f"spacing {tuple(sp)} does not match ndim {ndim}")
    return tuple(float(s) for s in sp)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: mask XOR erosion with face connectivity (outside the array = background)."""
    struct = ndi.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndi.binary_erosion(mask, structure=struct, iterations=1, border_value=0)


def surface_distances(pred, ref, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred surface -> ref surface, ref surface -> pred surface).

    Both masks must be non-empty. Computation is restricted to the joint bounding box (padded by
    one voxel so that the surfaces are unchanged), which keeps it fast on large volumes.
    """
    p, r = _as_bool(pred), _as_bool(ref)
    if p.shape != r.shape:
        raise ValueError(f"shape mismatch {p.shape} vs {r.shape}")
    if not p.any() or not r.any():
        raise ValueError("surface distances need two non-empty masks")
    sp = _spacing_tuple(spacing, p.ndim)
    # crop to the joint bounding box + 1 voxel margin (erosion treats outside as background
    # anyway, so the surfaces are identical; distances are unaffected by cropping)
    union = p | r
    sl = []
    for ax in range(p.ndim):
        other = tuple(i for i in range(p.ndim) if i != ax)
        idx = np.flatnonzero(union.any(axis=other))
        sl.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, p.shape[ax])))
    sl = tuple(sl)
    p, r = p[sl], r[sl]
    sp_surf, sr_surf = _surface(p), _surface(r)
    dt_to_r = ndi.distance_transform_edt(~sr_surf, sampling=sp)
    dt_to_p = ndi.distance_transform_edt(~sp_surf, sampling=sp)
    return dt_to_r[sp_surf], dt_to_p[sr_surf]


def hd95(pred, ref, spacing=None, mode: str = "medpy") -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (``spacing`` per axis, e.g. (sz, sy, sx)).

    ``mode="medpy"`` (default, TransUNet): 95th percentile of the union of both directed
    surface-distance sets. ``mode="monai"``: max of the two directed 95th percentiles.
    Returns ``nan`` if either mask is empty (use :func:`case_metrics` for the conventions).
    """
    p, r = _as_bool(pred), _as_bool(ref)
    if not p.any() or not r.any():
        return float("nan")
    d_pr, d_rp = surface_distances(p, r, spacing)
    if mode == "medpy":
        return float(np.percentile(np.concatenate([d_pr, d_rp]), 95))
    if mode == "monai":
        return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
    raise ValueError(f"unknown hd95 mode {mode!r} (use 'medpy' or 'monai')")


# ----------------------------------------------------------------------------------------------
# TransUNet per-case convention
# ----------------------------------------------------------------------------------------------
def case_metrics(
    pred,
    ref,
    spacing=None,
    *,
    both_empty_dice: float = 0.0,
    hd95_mode: str = "medpy",
) -> dict[str, float]:
    """Dice / IoU / HD95 (mm) of one class in one case with the TransUNet empty-mask convention.

    pred & ref non-empty -> computed; pred non-empty & ref empty -> Dice 1, IoU 1, HD95 0;
    pred empty & ref non-empty -> 0, 0, 0; both empty -> ``both_empty_dice`` (0.0 as in the
    spec/official code, pass 1.0 for the common "perfect when both empty" variant), HD95 0.
    Returns ``{"dice", "iou", "hd95_mm"}``.
    """
    p, r = _as_bool(pred), _as_bool(ref)
    pe, re_ = not p.any(), not r.any()
    if not pe and not re_:
        return {
            "dice": dice(p, r),
            "iou": iou(p, r),
            "hd95_mm": hd95(p, r, spacing, mode=hd95_mode),
        }
    if not pe and re_:
        return {"dice": 1.0, "iou": 1.0, "hd95_mm": 0.0}
    if pe and not re_:
        return {"dice": 0.0, "iou": 0.0, "hd95_mm": 0.0}
    v = float(both_empty_dice)
    return {"dice": v, "iou": v, "hd95_mm": 0.0}


def evaluate_labels(
    pred_labels,
    ref_labels,
    spacing,
    classes: Mapping[int, str],
    *,
    both_empty_dice: float = 0.0,
    hd95_mode: str = "medpy",
) -> dict[str, dict[str, float]]:
    """Per-class ``{"dice", "iou", "hd95_mm"}`` for label volumes, keyed by class name.

    ``classes`` maps label id -> name (e.g. ``{1: "liver", 2: "spleen"}``); conventions as in
    :func:`case_metrics`.
    """
    pl, rl = np.asarray(pred_labels), np.asarray(ref_labels)
    if pl.shape != rl.shape:
        raise ValueError(f"shape mismatch {pl.shape} vs {rl.shape}")
    out: dict[str, dict[str, float]] = {}
    for cid, name in classes.items():
        out[name] = case_metrics(
            pl == cid, rl == cid, spacing, both_empty_dice=both_empty_dice, hd95_mode=hd95_mode
        )
    return out


# ----------------------------------------------------------------------------------------------
# multi-annotator metrics
# ----------------------------------------------------------------------------------------------
def _flat_bin(masks, threshold: float = 0.5) -> np.ndarray:
    m = np.asarray(masks)
    if m.ndim < 1:
        raise ValueError("expected a stack (K, ...) of masks")
    b = m if m.dtype == bool else m > threshold
    return b.reshape(b.shape[0], -1)


def pairwise_iou_distance(a, b, threshold: float = 0.5) -> np.ndarray:
    """``D[i, j] = 1 - IoU(a_i, b_j)`` (0 when both empty) for stacks ``a (K, ...)``, ``b (M, ...)``.

    Non-bool inputs are binarised at ``> threshold``.
    """
    fa, fb = _flat_bin(a, threshold), _flat_bin(b, threshold)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError("mask shapes differ")
    if fa.shape[1] < 2**24:  # float32 sums of 0/1 are exact below 2**24
        inter = (fa.astype(np.float32) @ fb.astype(np.float32).T).astype(np.int64)
    else:
        inter = fa.astype(np.int64) @ fb.astype(np.int64).T
    sa = fa.sum(axis=1, dtype=np.int64)[:, None]
    sb = fb.sum(axis=1, dtype=np.int64)[None, :]
    union = sa + sb - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 - inter / union
    d = np.where(union == 0, 0.0, d)
    return d.astype(np.float64)


def generalized_energy_distance(annotations, samples) -> float:
    """Per-image **squared** generalized energy distance GED^2 (see module docstring).

    ``annotations (A, ...)`` and ``samples (N, ...)``; samples are binarised at ``> 0.5``.
    Pair means include ``i = i'`` and ``j = j'`` (diagonal zeros count), as in the BerDiff code.
    """
    d_ys = pairwise_iou_distance(annotations, samples)
    d_yy = pairwise_iou_distance(annotations, annotations)
    d_ss = pairwise_iou_distance(samples, samples)
    return float(2.0 * d_ys.mean() - d_yy.mean() - d_ss.mean())


#: short alias; also returns the squared GED
ged = generalized_energy_distance


def hm_iou(annotations, samples) -> float:
    """Hungarian-matched IoU: annotations and samples repeated cyclically to ``max(A, N)``,
    ``linear_sum_assignment`` on the ``1 - IoU`` matrix, mean IoU over matched pairs."""
    ya = _flat_bin(annotations)
    sa = _flat_bin(samples)
    n_a, n_s = ya.shape[0], sa.shape[0]
    if n_a == 0 or n_s == 0:
        raise ValueError("need at least one annotation and one sample")
    d = pairwise_iou_distance(ya, sa)  # (A, N), computed once
    length = max(n_a, n_s)
    ia = np.arange(length) % n_a
    js = np.arange(length) % n_s
    big = d[ia][:, js]
    row, col = linear_sum_assignment(big)
    return float((1.0 - big[row, col]).mean())


def soft_dice(
    annotations,
    samples_raw,
    thresholds: Sequence[float] = SOFT_DICE_THRESHOLDS,
    smooth: float = 1e-6,
) -> float:
    """Soft-Dice: mean over ``tau`` of Dice(mean(samples_raw) > tau, mean(annotations) > tau).

    ``samples_raw`` are the raw (not binarised) samples, e.g. probabilities in [0, 1].
    Dice = (2|P&R| + smooth) / (|P| + |R| + smooth) as in the official code (both empty -> 1).
    """
    ref = np.asarray(annotations, dtype=np.float64).mean(axis=0)
    pred = np.asarray(samples_raw, dtype=np.float64).mean(axis=0)
    if ref.shape != pred.shape:
        raise ValueError(f"shape mismatch {ref.shape} vs {pred.shape}")
    vals = []
    for t in thresholds:
        p, r = pred > t, ref > t
        inter = np.count_nonzero(p & r)
        vals.append((2.0 * inter + smooth) / (np.count_nonzero(p) + np.count_nonzero(r) + smooth))
    return float(np.mean(vals))


def dataset_multiannotator_metrics(
    items: Iterable[tuple[np.ndarray, np.ndarray]],
    n_list: Sequence[int] = (1, 4, 8, 16),
) -> dict[int, dict[str, float]]:
    """Average GED^2, HM-IoU and Soft-Dice over ALL images, for each sample count in ``n_list``.

    ``items``: iterable of ``(annotations (A, ...), samples_raw (N_i, ...))`` per image; the value
    at ``n`` uses the first ``n`` samples of every image (``ValueError`` if an image has fewer).
    Returns ``{n: {"ged": ..., "hm_iou": ..., "soft_dice": ..., "n_images": ...}}`` where
    ``"ged"`` is the mean of the per-image squared GED.
    """
    n_list = tuple(int(n) for n in n_list)
    if not n_list or min(n_list) < 1:
        raise ValueError("n_list must contain positive sample counts")
    acc = {n: {"ged": 0.0, "hm_iou": 0.0, "soft_dice": 0.0} for n in n_list}
    count = 0
    for annots, samples in items:
        annots = np.asarray(annots)
        samples = np.asarray(samples)
        if samples.shape[0] < max(n_list):
            raise ValueError(
                f"image {count} has {samples.shape[0]} samples, need {max(n_list)} for n_list"
            )
        for n in n_list:
            s = samples[:n]
            acc[n]["ged"] += generalized_energy_distance(annots, s)
            acc[n]["hm_iou"] += hm_iou(annots, s)
            acc[n]["soft_dice"] += soft_dice(annots, s)
        count += 1
    if count == 0:
        raise ValueError("no images")
    out: dict[int, dict[str, float]] = {}
    for n in n_list:
        out[n] = {k: v / count for k, v in acc[n].items()}
        out[n]["n_images"] = float(count)
    return out


def interrater_metrics(annotations) -> dict[str, float]:
    """The annotators' own GED^2, HM-IoU and Soft-Dice on one image, leave-one-out (see the module
    docstring): mean over k of ``f(annotations without k, [annotation k])``; plus
    ``"pairwise_iou"`` / ``"pairwise_dice"``, the means over distinct annotator pairs (both
    empty = 1). ``annotations (A, ...)`` binary, A >= 2 (``ValueError`` otherwise).
    """
    y = np.asarray(annotations)
    a = y.shape[0] if y.ndim else 0
    if a < 2:
        raise ValueError("inter-rater values need at least two annotators")
    acc = {"ged": 0.0, "hm_iou": 0.0, "soft_dice": 0.0}
    for k in range(a):
        others, one = np.delete(y, k, axis=0), y[k : k + 1]
        acc["ged"] += generalized_energy_distance(others, one)
        acc["hm_iou"] += hm_iou(others, one)
        acc["soft_dice"] += soft_dice(others, one.astype(np.float64))
    out = {k: v / a for k, v in acc.items()}
    d = pairwise_iou_distance(y, y)
    iu = np.triu_indices(a, 1)
    ious = 1.0 - d[iu]
    out["pairwise_iou"] = float(ious.mean())
    out["pairwise_dice"] = float((2 * ious / (1 + ious)).mean())
    return out
