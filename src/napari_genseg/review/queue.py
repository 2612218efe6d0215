"""The review queue: which slices need a human, in which order, and what the reader did with each.

Pure numpy/scipy (no napari, no torch). Slices are taken along ``axis`` of a (z, y, x) label
volume (0 = axial, the default; any axis on request). Each slice gets signals in [0, 1]:

* ``uncertainty``: the slice's uncertainty score (``predictors.uncertainty.slice_scores``, in %)
  divided by 100;
* ``area_jump``: for each foreground class with area a on each slice, a slice whose area is a
  local extremum (above both neighbours or below both) scores
  min(|a_i − a_{i−1}|, |a_i − a_{i+1}|) / max(a_{i−1}, a_i, a_{i+1}); the largest over classes.
  A slice left empty between two full ones scores 1, a spike of twice the neighbours' area 0.5,
  while an organ tapering in or out (monotone areas) and the end slices of the volume score 0;
* ``small_components``: 2-D connected pieces (8-connected) of a class other than its largest
  piece on that slice and smaller than ``min_component_mm2``: min(1, count / 2);
* ``reference``: 1 − mean Dice (over the classes present in the mask or the reference on that
  slice) against a reference mask, when one is given;
* ``models``: the slice's score (%) of the disagreement between the mask and other models' results
  on the same image (the dock gives the largest over classes of
  ``review.uncertainty.class_model_disagreement``), divided by 100;
* ``flags``: 1 where an external check flagged the slice (e.g. the post-processing plausibility
  flags, issue 6), given as ``{slice index: reason}``.

The score is the weighted sum (:data:`DEFAULT_WEIGHTS`); :func:`rank_slices` returns the slices
that hold any mask, reference or signal, highest score first (ties: lower index first).
:class:`ReviewState` keeps each slice's status (untouched, accepted, edited, flagged), edit
counts and timestamps, and writes the progress line ("12 of 40 slices with liver reviewed").
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "STATUSES",
    "REVIEWED",
    "DEFAULT_WEIGHTS",
    "QueueItem",
    "SIGNAL_LABELS",
    "slice_signals",
    "area_jump_scores",
    "small_component_scores",
    "reference_scores",
    "flag_scores",
    "rank_slices",
    "ReviewState",
]

STATUSES = ("untouched", "accepted", "edited", "flagged")
#: statuses that count as reviewed in the progress line
REVIEWED = ("accepted", "edited")
#: signal -> weight of the combined score
DEFAULT_WEIGHTS: dict[str, float] = {
    "uncertainty": 1.0,
    "area_jump": 0.5,
    "small_components": 0.5,
    "reference": 1.0,
    "models": 1.0,
    "flags": 1.0,
}


def _slices_first(a: np.ndarray, axis: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3:
        raise ValueError(f"expected a 3-D (z, y, x) volume; got shape {a.shape}")
    return np.moveaxis(a, axis % 3, 0)


def _classes(mask: np.ndarray, classes) -> list[int]:
    if classes is not None:
        return [int(c) for c in classes if int(c) != 0]
    return [int(c) for c in np.unique(mask) if c != 0]


def _areas(m: np.ndarray, cls: Sequence[int]) -> np.ndarray:
    """(n_slices, n_classes) voxel counts per slice of a slices-first volume."""
    return np.stack([(m == c).reshape(m.shape[0], -1).sum(1) for c in cls], 1) if cls else np.zeros((m.shape[0], 0))


def area_jump_scores(mask: np.ndarray, axis: int = 0, classes=None) -> np.ndarray:
    """(n,) jump of each class's area against its neighbours (see module docstring), in [0, 1]."""
    m = _slices_first(mask, axis)
    a = _areas(m, _classes(m, classes)).astype(np.float64)
    n = a.shape[0]
    if a.shape[1] == 0:
        return np.zeros(n)
    out = np.zeros(n)
    if n < 3:
        return out
    prev, mid, nxt = a[:-2], a[1:-1], a[2:]
    dp, dn = mid - prev, mid - nxt
    extremum = (dp * dn) > 0  # above both neighbours or below both
    top = np.maximum(np.maximum(prev, nxt), mid)
    jump = np.where(extremum, np.minimum(np.abs(dp), np.abs(dn)) / np.maximum(top, 1), 0.0)
    out[1:-1] = jump.max(1)
    return out


def small_component_scores(mask: np.ndarray, axis: int = 0, spacing=(1.0, 1.0, 1.0),
                           min_component_mm2: float = 100.0, classes=None) -> np.ndarray:
    """(n,) small disconnected 2-D pieces per slice: pieces of a class other than its largest on
    the slice, smaller than ``min_component_mm2`` (mm², from ``spacing`` (sz, sy, sx) mm),
    counted over classes; min(1, count / 2)."""
    m = _slices_first(mask, axis)
    sp = [float(s) for s in spacing]
    in_plane = [sp[i] for i in range(3) if i != axis % 3]
    px_mm2 = in_plane[0] * in_plane[1]
    struct = ndi.generate_binary_structure(2, 2)
    cls = _classes(m, classes)
    out = np.zeros(m.shape[0])
    for i in range(m.shape[0]):
        count = 0
        for c in cls:
            lab, k = ndi.label(m[i] == c, structure=struct)
            if k < 2:
                continue
            sizes = np.bincount(lab.ravel())[1:] * px_mm2
            sizes = np.sort(sizes)[:-1]  # all but the largest
            count += int((sizes < min_component_mm2).sum())
        out[i] = min(1.0, count / 2.0)
    return out


def reference_scores(mask: np.ndarray, reference: np.ndarray, axis: int = 0, classes=None) -> np.ndarray:
    """(n,) 1 − mean Dice per slice against ``reference`` over the classes present on the slice
    in either (0 where neither has any). Raises ``ValueError`` for different shapes."""
    m, r = _slices_first(mask, axis), _slices_first(reference, axis)
    if m.shape != r.shape:
        raise ValueError(f"mask {np.shape(mask)} and reference {np.shape(reference)} differ in shape")
    cls = sorted(set(_classes(m, classes)) | set(_classes(r, classes)))
    n = m.shape[0]
    if not cls:
        return np.zeros(n)
    flat_m, flat_r = m.reshape(n, -1), r.reshape(n, -1)
    dices, present = [], []
    for c in cls:
        pm, pr = flat_m == c, flat_r == c
        sm, sr = pm.sum(1), pr.sum(1)
        inter = (pm & pr).sum(1)
        dices.append(np.where(sm + sr > 0, 2.0 * inter / np.maximum(sm + sr, 1), 0.0))
        present.append(sm + sr > 0)
    d, p = np.stack(dices, 1), np.stack(present, 1)
    k = p.sum(1)
    return np.where(k > 0, 1.0 - (d * p).sum(1) / np.maximum(k, 1), 0.0)


def flag_scores(flags, n: int) -> tuple[np.ndarray, dict[int, str]]:
    """External per-slice flags -> ((n,) 0/1 scores, {index: reason}).

    ``flags``: ``{slice index: reason}`` (the hook for plausibility checks), a sequence of
    slice indices, or an (n,) bool array. Raises ``ValueError`` for an index outside 0..n-1."""
    if flags is None:
        return np.zeros(n), {}
    if isinstance(flags, Mapping):
        reasons = {int(k): str(v) for k, v in flags.items()}
    else:
        arr = np.asarray(flags)
        idx = np.flatnonzero(arr) if arr.dtype == bool else arr.astype(int).ravel()
        reasons = {int(i): "flagged" for i in idx}
    bad = [i for i in reasons if not 0 <= i < n]
    if bad:
        raise ValueError(f"flagged slice {bad[0]} is outside 0..{n - 1}")
    s = np.zeros(n)
    s[list(reasons)] = 1.0
    return s, reasons


#: how the dock names each signal in the "why" column
SIGNAL_LABELS = {"uncertainty": "uncertain", "area_jump": "area jump", "small_components": "small pieces",
                 "reference": "vs reference", "models": "models disagree",
                 "flags": "flagged"}


@dataclass
class QueueItem:
    """One slice in the queue: its index along the axis, combined score, the signals that are
    non-zero (name -> value in [0, 1]) and the flag reason when flagged."""

    index: int
    score: float
    signals: dict[str, float]
    note: str = ""

    @property
    def reasons(self) -> str:
        """The non-zero signals, strongest first, as a short text (e.g. "uncertain 0.42, area jump 0.30")."""
        parts = sorted(self.signals.items(), key=lambda kv: -kv[1])
        text = ", ".join(f"{SIGNAL_LABELS.get(k, k)} {v:.2f}" for k, v in parts)
        return f"{text} ({self.note})" if self.note else text


def slice_signals(mask: np.ndarray, axis: int = 0, spacing=(1.0, 1.0, 1.0), uncertainty=None,
                  reference=None, flags=None, min_component_mm2: float = 100.0, models=None) -> dict[str, np.ndarray]:
    """Every signal of the module docstring, each (n,) in [0, 1]; ``uncertainty`` and ``models``
    are (n,) per-slice scores in % (absent signals are left out)."""
    m = _slices_first(mask, axis)
    n = m.shape[0]
    sig = {
        "area_jump": area_jump_scores(mask, axis),
        "small_components": small_component_scores(mask, axis, spacing, min_component_mm2),
    }
    for key, val in (("uncertainty", uncertainty), ("models", models)):
        if val is None:
            continue
        u = np.asarray(val, dtype=np.float64).ravel()
        if u.shape != (n,):
            raise ValueError(f"{key} needs one score per slice ({n}); got {u.shape[0]}")
        sig[key] = np.clip(u / 100.0, 0.0, 1.0)
    if reference is not None:
        sig["reference"] = reference_scores(mask, reference, axis)
    if flags is not None:
        sig["flags"], _ = flag_scores(flags, n)
    return sig


def rank_slices(mask: np.ndarray, axis: int = 0, spacing=(1.0, 1.0, 1.0), uncertainty=None,
                reference=None, flags=None, weights: Mapping[str, float] | None = None,
                min_component_mm2: float = 100.0, models=None) -> list[QueueItem]:
    """The review queue: slices along ``axis`` that hold mask, reference or any signal, highest
    combined score first. See the module docstring for the signals; ``weights`` override
    :data:`DEFAULT_WEIGHTS` per signal. Raises ``ValueError`` for shapes that do not fit."""
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    sig = slice_signals(mask, axis, spacing, uncertainty, reference, flags, min_component_mm2, models)
    m = _slices_first(mask, axis)
    n = m.shape[0]
    present = m.reshape(n, -1).any(1)
    if reference is not None:
        present |= _slices_first(reference, axis).reshape(n, -1).any(1)
    _, reasons = flag_scores(flags, n)
    total = sum(w.get(k, 0.0) * v for k, v in sig.items())
    items = []
    for i in range(n):
        nz = {k: float(v[i]) for k, v in sig.items() if v[i] > 0}
        if not present[i] and not nz:
            continue
        items.append(QueueItem(i, float(total[i]), nz, reasons.get(i, "")))
    items.sort(key=lambda it: (-it.score, it.index))
    return items


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class ReviewState:
    """What the reader did, per slice along ``axis`` of a volume with ``n_slices`` slices.

    ``status[i]`` is one of :data:`STATUSES`; ``edits[i]`` counts paint events on slice i;
    ``changed[i]`` is the time (ISO 8601) of the last status change or edit. ``accept``/``flag``
    set a status, ``mark_edited`` records an edit (status "edited"; an accepted slice that is
    painted becomes edited). Raises ``ValueError`` for an unknown status or index.
    """

    n_slices: int
    axis: int = 0
    status: list[str] = field(default_factory=list)
    edits: list[int] = field(default_factory=list)
    changed: dict[int, str] = field(default_factory=dict)
    started: str = field(default_factory=_now)

    def __post_init__(self):
        if not self.status:
            self.status = ["untouched"] * self.n_slices
        if not self.edits:
            self.edits = [0] * self.n_slices
        if len(self.status) != self.n_slices or len(self.edits) != self.n_slices:
            raise ValueError("status and edit counts need one entry per slice")

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.n_slices:
            raise ValueError(f"slice {i} is outside 0..{self.n_slices - 1}")
        return i

    def set_status(self, i: int, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r} (one of {', '.join(STATUSES)})")
        i = self._check(i)
        self.status[i] = status
        self.changed[i] = _now()

    def accept(self, i: int) -> None:
        self.set_status(i, "accepted")

    def flag(self, i: int) -> None:
        self.set_status(i, "flagged")

    def mark_edited(self, slices) -> None:
        """Record one edit on each slice in ``slices`` (an int or an iterable of ints)."""
        for i in np.atleast_1d(np.asarray(slices, dtype=int)):
            i = self._check(i)
            self.edits[i] += 1
            if self.status[i] != "flagged":
                self.status[i] = "edited"
            self.changed[i] = _now()

    def accepted_slices(self) -> list[int]:
        return [i for i, s in enumerate(self.status) if s == "accepted"]

    def counts(self) -> dict[str, int]:
        return {s: self.status.count(s) for s in STATUSES}

    def progress(self, mask: np.ndarray, class_names: Sequence[str] | None = None) -> str:
        """"12 of 40 slices with liver reviewed; 3 of 9 with spleen" (+ ", 2 flagged"): per class
        present in ``mask`` (3-D, slices along ``axis``), the slices holding it and how many of
        those are accepted or edited. Names from ``class_names`` (index = label id)."""
        m = _slices_first(mask, self.axis)
        if m.shape[0] != self.n_slices:
            raise ValueError(f"mask has {m.shape[0]} slices along axis {self.axis}, the review {self.n_slices}")
        done = np.array([s in REVIEWED for s in self.status])
        parts = []
        for j, c in enumerate(_classes(m, None)):
            name = class_names[c] if class_names is not None and c < len(class_names) else f"label {c}"
            has = m.reshape(m.shape[0], -1).__eq__(c).any(1)
            lead = "slices with " if j == 0 else "with "
            parts.append(f"{int((has & done).sum())} of {int(has.sum())} {lead}{name}")
        text = ("; ".join(parts) + " reviewed") if parts else "no mask to review"
        flagged = self.status.count("flagged")
        return text + (f", {flagged} flagged" if flagged else "")

    def to_dict(self) -> dict:
        return {"n_slices": self.n_slices, "axis": self.axis, "status": list(self.status),
                "edits": list(self.edits), "changed": {str(k): v for k, v in self.changed.items()},
                "started": self.started}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ReviewState":
        """The state written by :meth:`to_dict`. Raises ``ValueError`` when it does not fit."""
        st = cls(int(d["n_slices"]), int(d.get("axis", 0)), list(d["status"]), [int(e) for e in d["edits"]],
                 {int(k): str(v) for k, v in (d.get("changed") or {}).items()}, str(d.get("started") or _now()))
        bad = [s for s in st.status if s not in STATUSES]
        if bad:
            raise ValueError(f"unknown status {bad[0]!r} in the review state")
        return st
