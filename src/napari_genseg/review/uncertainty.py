"""The uncertainty volume of a mask: class votes of K TTA views or N AR-Seg samples, one form.

Pure numpy. :class:`VoteVolume` holds per-class vote counts (C, Z, H, W) uint8 for the slices
that were run and turns them, against whatever mask is shown now (the model's un-augmented output
or the reader's edit of it), into the per-voxel disagreement in % and a per-slice score
(``predictors.uncertainty.class_vote_disagreement`` / ``slice_scores``: the definition AR-Seg's
variability uses). Slices that were not run have no votes and score 0.

Model agreement per class (:func:`class_model_disagreement`): for each class of the mask shown,
the % of the other models that know that class (matched by class name, so MSA²Net's multi-organ
ids and AR-Seg's liver-only id 1 line up) whose "is it this class?" answer differs from the
mask's, per voxel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..predictors.uncertainty import class_vote_disagreement, slice_scores

__all__ = ["VoteVolume", "votes_from_result", "model_disagreement", "ClassDisagreement", "class_model_disagreement"]


@dataclass
class VoteVolume:
    """votes: (C, Z, H, W) uint8 counts of the ``n`` predictions per class (0 on slices not run);
    z: the slices that were run (axis 0); source: "tta" or "arseg"; views: the view names (TTA)."""

    votes: np.ndarray
    n: int
    z: list[int]
    source: str = "tta"
    views: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.votes.shape[1:])

    def disagreement(self, shown: np.ndarray, slices=None) -> np.ndarray:
        """(Z, H, W) float32 % of predictions disagreeing with ``shown`` (Z, H, W) labels; 0 on
        slices not run. ``slices``: compute only these axial slices (others 0)."""
        shown = np.asarray(shown)
        if shown.shape != self.shape:
            raise ValueError(f"mask {shown.shape} does not match the uncertainty volume {self.shape}")
        out = np.zeros(self.shape, np.float32)
        zs = sorted(set(self.z) if slices is None else set(self.z) & {int(s) for s in np.atleast_1d(slices)})
        if zs:
            out[zs] = class_vote_disagreement(self.votes[:, zs], self.n, shown[zs])
        return out

    def slice_scores(self, shown: np.ndarray, axis: int = 0, disagreement: np.ndarray | None = None) -> np.ndarray:
        """Per-slice score (%) along ``axis`` of the disagreement with ``shown``."""
        d = self.disagreement(shown) if disagreement is None else disagreement
        return slice_scores(d, shown, axis)

    def record(self) -> dict:
        """What the review log keeps of the uncertainty run."""
        return {"source": self.source, "n": self.n, "views": list(self.views), "slices_run": len(self.z)}


def votes_from_result(result, source: str = "tta", views=(), n: int | None = None,
                      target_class: int = 1) -> VoteVolume:
    """A :class:`VoteVolume` from an engine ``VolumeResult``: TTA's ``extras["class_votes"]``
    ((C, H, W) per slice) or AR-Seg's ``extras["votes"]`` ((H, W) of ``target_class`` per slice,
    with ``n`` samples). Raises ``ValueError`` when the result carries neither."""
    zs = sorted(result.z)
    shape = result.labels.shape
    if "class_votes" in result.extras:
        per = result.extras["class_votes"]
        c = next(iter(per.values())).shape[0] if per else 1
        votes = np.zeros((c, *shape), np.uint8)
        for z in zs:
            votes[:, z] = per[z]
        k = int(votes[:, zs[0]].sum(0).max()) if zs else (n or 1)
        return VoteVolume(votes, int(n or k), zs, source, list(views))
    if "votes" in result.extras:
        if n is None:
            raise ValueError("AR-Seg votes need the number of samples n")
        c = max(int(target_class) + 1, 2)
        votes = np.zeros((c, *shape), np.uint8)
        for z in zs:
            v = np.asarray(result.extras["votes"][z], dtype=np.uint8)
            votes[target_class, z] = v
            votes[0, z] = n - v
        return VoteVolume(votes, int(n), zs, "arseg", [])
    raise ValueError("the run produced no votes (need a TTA or AR-Seg predictor)")


def model_disagreement(shown: np.ndarray, others) -> np.ndarray:
    """Model agreement: (Z, H, W) float32 % of the other models' label volumes (each (Z, H, W),
    e.g. MSA²Net's and AR-Seg's results on the same image) whose label differs from ``shown``,
    the same definition as the uncertainty maps (the other models are the N predictions).
    Raises ``ValueError`` without other models or for shapes that differ."""
    shown = np.asarray(shown)
    others = [np.asarray(o) for o in others]
    if not others:
        raise ValueError("model agreement needs at least one other model's result")
    if any(o.shape != shown.shape for o in others):
        raise ValueError(f"every model's result must have the mask's shape {shown.shape}")
    c = int(max([shown.max(initial=0)] + [o.max(initial=0) for o in others])) + 1
    votes = np.zeros((c, *shown.shape), np.uint8)
    for o in others:
        for k in range(c):
            votes[k] += o == k
    return class_vote_disagreement(votes, len(others), shown)


@dataclass
class ClassDisagreement:
    """Model agreement for one class of the mask shown: ``data`` (Z, H, W) float32 % of the
    ``models`` (indices into the ``others`` given) that disagree with the mask about ``name``
    (label id ``class_id`` in the mask)."""

    class_id: int
    name: str
    data: np.ndarray
    models: list[int]

    def slice_scores(self, shown: np.ndarray, axis: int = 0) -> np.ndarray:
        """(n,) per-slice score (%) along ``axis``: the mean disagreement over the voxels where
        the mask has this class or some model disagrees (``predictors.uncertainty.slice_scores``)."""
        return slice_scores(self.data, np.asarray(shown) == self.class_id, axis)


def class_model_disagreement(shown: np.ndarray, shown_names, others) -> list[ClassDisagreement]:
    """Model agreement per class: one :class:`ClassDisagreement` per class of ``shown`` (Z, H, W)
    that at least one other model can label.

    ``shown_names``: label id -> class name of the mask (None: ids 1..max are "label N");
    ``others``: ``[(labels (Z, H, W), names or None), ...]``, the other models' results on the
    same image. A class is matched by name when both sides have names (a model without the class
    in its names abstains for it), else by id. Per voxel: 100 · (models whose ``== class`` differs
    from the mask's ``== class``) / (models that know the class). Raises ``ValueError`` without
    other models or for shapes that differ."""
    shown = np.asarray(shown)
    if not others:
        raise ValueError("model agreement needs at least one other model's result")
    others = [(np.asarray(o), list(n) if n else None) for o, n in others]
    if any(o.shape != shown.shape for o, _ in others):
        raise ValueError(f"every model's result must have the mask's shape {shown.shape}")
    if shown_names:
        classes = [(i, str(n)) for i, n in enumerate(shown_names) if i > 0]
    else:
        top = int(max([shown.max(initial=0)] + [o.max(initial=0) for o, n in others if not n]))
        classes = [(i, f"label {i}") for i in range(1, top + 1)]
    out = []
    for cid, name in classes:
        mine = shown == cid
        total = np.zeros(shown.shape, np.float32)
        voters = []
        for k, (o, names) in enumerate(others):
            if names and shown_names:
                if name not in names:
                    continue  # this model does not segment the class: it abstains
                oid = names.index(name)
            else:
                oid = cid
            total += (o == oid) != mine
            voters.append(k)
        if voters:
            out.append(ClassDisagreement(cid, name, total * np.float32(100.0 / len(voters)), voters))
    return out
