"""Per-voxel uncertainty shared by every predictor: how many predictions disagree with the mask shown.

Definition (one for all models): for each voxel, the percentage of the N predictions of a class
that disagree with the mask shown for that class,

    disagreement = 100 · #{predictions ≠ shown} / N
                 = 100 · (N − v) / N   where the shown mask marks the voxel,
                 = 100 · v / N         where it does not,

with v the number of predictions that mark the voxel ("votes"). 0 % = every prediction agrees with
what the user sees. For AR-Seg the N predictions are the N samples and the mask shown is their
consensus at threshold t (v / N > t, paper Sec. 2.4: mean of the sample masks > 0.5): at t = 0.5 the
value tops out at 50 % (an even split), at another threshold it reaches max(t, 1 − t) · 100 %
(see :func:`max_disagreement_percent`). A deterministic model (one prediction) gives 0 % where
the shown mask is its own output and 100 % where the mask shown was changed against it.

For deterministic models the N predictions are K test-time views (``predictors.tta``) and the mask
shown is the un-augmented prediction (or the user's edit of it). With several classes a prediction
disagrees where its label differs from the label shown: with ``class_votes`` (C, ...) the number
of predictions per class, the agreeing count is ``class_votes[shown]``
(:func:`class_vote_disagreement`; for two classes it is exactly :func:`disagreement_percent`).
A slice's score (:func:`slice_scores`) is the mean disagreement over the voxels where the mask
shown or any prediction disagreeing with it is foreground (0 for a slice where nothing is).
"""

from __future__ import annotations

import numpy as np

__all__ = ["disagreement_percent", "max_disagreement_percent", "class_vote_disagreement", "slice_scores"]


def disagreement_percent(votes: np.ndarray, n: int, shown: np.ndarray) -> np.ndarray:
    """Percentage (0-100, float32) of the ``n`` predictions that disagree with ``shown``.

    votes: (...) integer counts in 0..n of the predictions marking each voxel; shown: (...) bool,
    the mask shown (same shape). Raises ``ValueError`` for n < 1, shape mismatch or votes > n.
    """
    if n < 1:
        raise ValueError("need at least one prediction")
    votes = np.asarray(votes)
    shown = np.asarray(shown, dtype=bool)
    if votes.shape != shown.shape:
        raise ValueError(f"votes {votes.shape} and shown mask {shown.shape} differ in shape")
    v = votes.astype(np.float32)
    if v.size and (v.min() < 0 or v.max() > n):
        raise ValueError(f"votes must lie in 0..{n}")
    return (100.0 / n) * np.where(shown, n - v, v)


def max_disagreement_percent(threshold: float) -> float:
    """The largest value :func:`disagreement_percent` takes against a consensus ``votes / N >
    threshold``: 100 · max(t, 1 − t) (50 at t = 0.5), the top of the colour range."""
    return 100.0 * max(float(threshold), 1.0 - float(threshold))


def class_vote_disagreement(class_votes: np.ndarray, n: int, shown_labels: np.ndarray) -> np.ndarray:
    """Percentage (0-100, float32) of the ``n`` predictions whose label differs from the label shown.

    class_votes: (C, ...) counts per class (summing to ``n`` over C); shown_labels: (...) integer
    label ids. A label shown that no prediction can give (id >= C, e.g. painted by hand with a new
    id) counts as disagreed with by all. Raises ``ValueError`` for mismatched shapes or votes > n.
    """
    class_votes = np.asarray(class_votes)
    shown = np.asarray(shown_labels)
    if class_votes.shape[1:] != shown.shape:
        raise ValueError(f"class votes {class_votes.shape} do not match the mask shown {shown.shape}")
    c = class_votes.shape[0]
    idx = np.clip(shown.astype(np.int64), 0, c - 1)[None]
    agree = np.take_along_axis(class_votes, idx, axis=0)[0]
    agree = np.where(shown < c, agree, 0)
    return disagreement_percent(agree, n, np.ones(shown.shape, dtype=bool))


def slice_scores(disagreement: np.ndarray, shown_labels: np.ndarray, axis: int = 0) -> np.ndarray:
    """Per-slice uncertainty score (%) along ``axis``: the mean of ``disagreement`` over the voxels
    of that slice where the mask shown is foreground or some prediction disagrees; 0 where neither.

    disagreement, shown_labels: same shape (e.g. (Z, H, W)); returns (shape[axis],) float32.
    """
    d = np.asarray(disagreement, dtype=np.float32)
    shown = np.asarray(shown_labels)
    if d.shape != shown.shape:
        raise ValueError(f"disagreement {d.shape} and mask shown {shown.shape} differ in shape")
    region = (shown > 0) | (d > 0)
    other = tuple(i for i in range(d.ndim) if i != axis % d.ndim)
    count = region.sum(axis=other)
    total = np.where(region, d, 0.0).sum(axis=other, dtype=np.float64)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32)
