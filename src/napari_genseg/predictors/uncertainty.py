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
"""

from __future__ import annotations

import numpy as np

__all__ = ["disagreement_percent", "max_disagreement_percent"]


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
